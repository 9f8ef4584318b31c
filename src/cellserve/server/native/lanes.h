// What the stream lanes (lanes.cpp) and the token lanes (token_lanes.cpp) share: their clock and the envelope
// of an answer. Needs the protocol's generated messages (CELLSERVE_LANES builds only).
#pragma once

#include <chrono>
#include <string>

#include "grpc_service.pb.h"

namespace cellserve_front {

// CLOCK_MONOTONIC seconds: Python's time.perf_counter, and the step loop's clock.
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A lane's answer to one message: a ModelInferResponse, inside a ModelStreamInferResponse on a stream.
class LaneAnswer {
 public:
  LaneAnswer(bool stream, const std::string &model, const std::string &version, const std::string &id)
      : stream_(stream), response_(stream ? *stream_answer_.mutable_infer_response() : unary_answer_) {
    response_.set_model_name(model);
    response_.set_model_version(version);
    response_.set_id(id);
  }
  LaneAnswer(const LaneAnswer &) = delete;  // (response_ refers into this object)
  LaneAnswer &operator=(const LaneAnswer &) = delete;
  inference::ModelInferResponse &response() { return response_; }
  std::string bytes() const {
    return stream_ ? stream_answer_.SerializeAsString() : unary_answer_.SerializeAsString();
  }

 private:
  bool stream_;
  inference::ModelStreamInferResponse stream_answer_;
  inference::ModelInferResponse unary_answer_;
  inference::ModelInferResponse &response_;
};

}  // namespace cellserve_front
