// A token lane's face to the wires (token_lanes.cpp): gRPC (lanes.cpp) and HTTP (http_front.cpp) each read a
// stateless request into a TokenAsk, and encode the LaneTensors the lane answers with. The lane's checks and
// its admission into the step loop are one code for both, so both wires take exactly the same requests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace cellserve_front {

struct Lanes;
struct TokenLane;

// A request as a wire gives it, before the lane's checks. Anything a wire cannot express here exactly as
// Python would read it sets `parameters` (or `values_ok` false), and the request goes to Python.
struct TokenAsk {
  struct Input {
    std::string name, datatype;
    std::vector<int64_t> shape;
    bool parameters = false;  // parameters the lane does not read
    bool values_ok = false;   // values read as the datatype says (INT64: ints, BYTES: texts)
    std::vector<int64_t> ints;
    std::vector<std::string> texts;
  };
  struct Output {
    std::string name;
    bool parameters = false;
  };
  std::string version, id;
  bool parameters = false;
  std::vector<Input> inputs;
  std::vector<Output> outputs;
};

// One output tensor of an answer, in the requested order; one of ints, reals or texts holds its values.
struct LaneTensor {
  std::string name, datatype;
  std::vector<int64_t> shape;
  std::vector<int64_t> ints;
  std::vector<double> reals;
  std::vector<std::string> texts;
};

// The binary form both wires share (gRPC's raw contents, HTTP's binary tensor extension): little-endian values,
// BYTES each after its 4-byte length. read_raw fills in.ints or in.texts as in.datatype says, and sets
// values_ok where the bytes parse so.
std::string raw_of(const LaneTensor &tensor);
void read_raw(const char *data, size_t size, TokenAsk::Input &in);

// Called on the thread that steps the loop with the answer; it encodes it for its wire and writes it.
using TokenReply = std::function<void(std::vector<LaneTensor> &&outputs)>;

TokenLane *lanes_token_lane(Lanes *lanes, const std::string &model);  // nullptr: the model has none
const std::string &token_lane_version(const TokenLane *lane);
bool token_lane_scores(const TokenLane *lane);  // a scoring model (log_likelihood, next_token)
// True: taken (reply runs once, later, on the thread that steps the loop); false: Python's (nothing was kept).
// protocol: "grpc" or "http", for the access log. step_here: the loop was idle and its worker was not woken;
// the caller steps it (token_lanes_step) until that leaves it out, between its own I/O.
bool token_lane_take(TokenLane *lane, const TokenAsk &ask, const std::string &logged_id, const char *protocol,
                     TokenReply reply, bool *step_here);
// A turn of stepping each lane's loop on this thread; lanes whose loop has idled or gone to its worker leave
// the list. Call again, after the caller's pending I/O, while any remain.
void token_lanes_step(std::vector<TokenLane *> &lanes);

}  // namespace cellserve_front
