// The native gRPC front end's parts, shared by its translation units: the inbox Python drains (grpc_front.cpp),
// the calls (grpc++'s asynchronous API, grpc_front.cpp) and the stream lanes (lanes.cpp), which answer the
// session messages of the models Python hands them without Python per message.
#pragma once

#include <Python.h>

#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace cellserve_front {

extern const char STREAM_METHOD[];
// RECORDS: a token lane has answered requests to record (statistics, metrics, access lines): Python's
// dispatcher records them (Front.flush_lanes), so no step loop waits for the GIL or runs Python for them.
enum Kind { UNARY = 0, STREAM_MESSAGE = 1, STREAM_CLOSED = 2, CALL_ENDED = 3, WOKEN = 4, RECORDS = 5 };

struct Inbound {
  uint64_t call;
  int kind;
  std::string method, payload;
  std::vector<std::pair<std::string, std::string>> metadata;  // a call's first message for Python only
};

struct Inbox {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Inbound> items;
  bool stopped = false;

  void push(Inbound &&item) {
    {
      std::lock_guard<std::mutex> lock(mu);
      items.push_back(std::move(item));
    }
    cv.notify_one();
  }
};

struct TokenLane;

// What a lane does with a message it was offered (Lanes::offer).
struct Offer {
  enum What { PYTHON, TAKEN, ANSWERED, FAILED } what = PYTHON;
  bool hold = false;               // TAKEN: the stream's session is past its pending chunks: read no further
  std::string answer;              // ANSWERED: a stream's error message (ModelStreamInferResponse)
  grpc::StatusCode code = grpc::StatusCode::OK;  // FAILED: a unary call's status
  std::string message;
  TokenLane *step = nullptr;       // TAKEN into an idle step loop: the poller steps it (Front::stepping)
};

struct Front;
struct Lanes;
struct HttpFront;  // http_front.cpp (CELLSERVE_HTTP builds)

// One call of any method (a generic call is a bidirectional stream of byte buffers). Its operations complete
// on the front's completion queue, whose one thread runs completed(): no grpc thread pool, no executor hop.
class Call {
 public:
  explicit Call(Front *front);  // asks the service for the next call
  void write(const char *data, size_t size, bool last);  // last: finish OK after it (a unary answer)
  void fail(grpc::StatusCode code, const std::string &message);
  void finish_when_written();  // a stream: finish OK once every message read is answered and written
  void pause();
  void resume();
  void release_hold();  // a lane's session is back under its pending chunks: read on (when nothing else holds)

  enum OpKind { STARTED = 0, READ, WRITE, FINISH, DONE };
  struct Op {  // a completion queue tag: which call, which of its operations
    Call *call;
    OpKind kind;
  };
  void completed(OpKind kind, bool ok);  // the completion queue's thread

 private:
  void started(bool ok);
  void read_done(bool ok);
  void take_locked(bool ok);  // a message read (ok), or the end of the client's messages
  void write_done(bool ok);
  void start_read_locked();
  void start_write_locked();
  void finish_locked(const grpc::Status &status);
  void send_finish_locked();
  bool reading_held() const;
  // over: done, nothing in flight, and started (a done notification may come before started() ran)
  bool over_locked() const { return id_ != 0 && done_ && !reading_ && !writing_ && !finishing_; }
  void end();  // out of the registry, Python told, deleted

  Front *front_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter rpc_{&ctx_};
  Op ops_[5];
  uint64_t id_ = 0;
  bool stream_ = false;
  std::recursive_mutex mu_;
  grpc::ByteBuffer in_;
  std::deque<grpc::ByteBuffer> out_;
  grpc::Status status_;  // the status to send once the write in flight is done
  bool reading_ = false, writing_ = false, finishing_ = false, done_ = false, finish_waits_ = false;
  bool finished_ = false, finish_after_writes_ = false, paused_ = false, read_waiting_ = false;
  bool answered_ = false, sent_metadata_ = false;
  int unanswered_ = 0;  // a stream's messages read and not answered yet (Python's and the lanes')
  int lane_holds_ = 0;  // lane sessions of this stream past their pending chunks
};

struct Front {
  Inbox inbox;
  std::mutex registry_mu;
  std::unordered_map<uint64_t, Call *> calls;
  std::atomic<uint64_t> next_id{1};
  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server;
  std::thread poller;       // runs every call's completions
  std::mutex accept_mu;     // stopping and asking for the next call, one at a time
  bool stopping = false;
  Lanes *lanes = nullptr;  // built with the protocol's messages (lanes.cpp); else every message goes to Python
  // Answers from other threads (a step loop's worker), written by the poller: see post()
  struct Outgoing {
    uint64_t call;
    std::string bytes;
    bool last;
  };
  std::mutex outbox_mu;
  std::vector<Outgoing> outbox;
  bool outbox_kicked = false, outbox_open = true;
  // made with the gRPC server only: an Alarm, like the server, holds grpc's library (grpc_init), which a front
  // that serves HTTP alone never took
  std::unique_ptr<grpc::Alarm> kick;
  Call::Op kick_op{nullptr, Call::STARTED};
  void post(uint64_t call, std::string &&bytes, bool last);
  void write_outbox();  // the poller, on kick_op
  HttpFront *http = nullptr;  // the HTTP front end, where Python asked for it (serve_http)
  // The poller's own: token lanes whose idle loop it steps itself between its completions (a request at one
  // client then wakes no other thread: loop_face.h)
  std::vector<TokenLane *> stepping;
  void step_soon(TokenLane *lane);

  // Runs `op` on a live call under the registry lock (so the call cannot be deleted meanwhile); false when
  // the call is gone. Lock order: registry, then a call's, then a lane's.
  template <class Op>
  bool with_call(uint64_t id, Op op) {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = calls.find(id);
    if (it == calls.end()) return false;
    op(it->second);
    return true;
  }
};

// token_lanes.cpp: the stateless requests of a model on a native step loop (the lanes' registry offers them)
void token_lanes_step(std::vector<TokenLane *> &lanes);  // (token_lanes.h)

// lanes.cpp (only where the protocol's messages were generated: CELLSERVE_LANES)
Lanes *lanes_new(Front *front);
// under the call's lock; logged_id: the call's x-request-id header (a unary call's), which names the request in
// the access log as on the Python path (its answer keeps the message's id)
Offer lanes_offer(Lanes *lanes, uint64_t call, bool stream, const std::string &payload, const std::string &logged_id);
void lanes_stop(Lanes *lanes);     // without the GIL: the workers finish their steps and end
void lanes_delete(Lanes *lanes);   // with the GIL (drops the step functions)
PyObject *lanes_add(Lanes *lanes, PyObject *args);  // with the GIL: Front.add_lane's arguments
PyObject *lanes_add_tokens(Lanes *lanes, PyObject *args);  // with the GIL: Front.add_token_lane's arguments
void lanes_drain(Lanes *lanes);
void lanes_flush(Lanes *lanes);  // with the GIL: what token lanes answered, to their statistics now
long lanes_sessions(Lanes *lanes, const std::string &model);

}  // namespace cellserve_front
