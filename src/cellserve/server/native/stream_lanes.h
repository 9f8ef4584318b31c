// A stream lane's face to the wires other than gRPC (lanes.cpp holds the lanes and reads gRPC itself): the
// native WebSocket sessions (websocket_front.cpp) admit their messages here, into the same sessions, batches
// and steps as gRPC's, and get the outputs back to encode for their wire.
#pragma once

#include <Python.h>

#include <functional>
#include <string>
#include <vector>

namespace cellserve_front {

struct Lanes;
struct Lane;

// A session message as a wire read it, checked against the lane's input (FP32, whole chunks, finite).
struct StreamAsk {
  std::string sid, id;   // id: the message's request id ("" where it has none: the access log names it)
  bool start = false;    // the session's first message (its state and context start at zero)
  bool snapshot = false; // the answer carries the session's snapshot (sequence_snapshot)
  int chunks = 0;
  std::vector<float> samples;        // chunks x the lane's samples per chunk
  std::vector<std::string> wanted;   // outputs asked for, in order (none: every output of the lane)
};

// The answer to one message: an error (what the Python path would have said), or its outputs in order, each
// the little-endian bytes of [chunks, ...] FP32 (sequence_snapshot: the snapshot's text).
struct StreamResult {
  std::string error;
  int chunks = 0;
  std::vector<std::string> names, raw;
};
using StreamReply = std::function<void(StreamResult &&)>;  // on a lane's worker

struct StreamLaneInfo {
  std::string version, input;
  int chunk = 0, max_pending = 0;
  bool websocket = false;  // its sessions may open as native WebSockets
  std::vector<std::string> outputs;
  PyObject *step = nullptr;  // the lane's _LaneStep (borrowed: the lane holds it until the front is deleted)
};

Lane *lanes_stream_lane(Lanes *lanes, const std::string &model);  // nullptr: the model has none
StreamLaneInfo stream_lane_info(const Lane *lane);
// Empty: taken (reply runs once, later, on a worker). Otherwise why not, and its HTTP status in `status`
// (protocol: the access log's name of the wire).
std::string stream_lane_admit(Lane *lane, StreamAsk &&ask, const char *protocol, StreamReply reply, int &status);
// A message the wire refused itself (malformed): counted and logged as the lane's refusals are.
void stream_lane_refused(Lane *lane, int status, const std::string &id, const char *protocol);
// The wire's session is over (its connection closed): it ends once its messages in a step are answered, and
// Python remembers why, for a later message naming it.
void stream_lane_close(Lane *lane, const std::string &sid);

}  // namespace cellserve_front
