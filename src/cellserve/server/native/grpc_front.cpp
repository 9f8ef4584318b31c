// The gRPC wire in native code: HTTP/2, framing, flow control, TLS and message limits are grpc++'s (the
// distribution's libgrpc++), on its asynchronous API with one generic service, so every method of
// inference.GRPCInferenceService arrives here as bytes, and every operation completes on one completion
// queue that one thread of ours drains (as Triton's front end does). Measured against grpc++'s callback API
// (its own pool of polling threads and an executor), on this front's first host, an echo of unary calls from
// the native load generator: 146-156 -> 62-65 us of server CPU per call at 1 client, 39-40 -> 21 at 16.
// Each call's messages go to one inbox that Python drains in batches (take: one GIL acquisition for every
// message that arrived meanwhile, never a task or a thread switch per message), or to a lane, which answers
// them natively; Python's answers come back by call id (reply / fail / finish) and are written from here, and
// the lanes' answers are posted to the poller thread, which writes them (Front::post). A
// stream is read ahead until Python pauses it (flow control), and its answers are queued and written one at
// a time, as grpc allows one write in flight.
//
// Lifetime: a Call asks the service for a call and is deleted once the call is over: its done notification
// came and none of its operations is in flight. Every operation on it runs under its own mutex (recursive: a
// lane's refusal fails the call from inside read_done) and checks `finished_`, which is set before the status
// is sent or once the call is cancelled, so Python's late answers (the client gone) find the call finished,
// or absent from the registry, and are dropped.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <chrono>

#include <pthread.h>

#include <absl/synchronization/mutex.h>

#include "front.h"
#ifdef CELLSERVE_HTTP
#include "http_front.h"
#endif

namespace cellserve_front {

const char STREAM_METHOD[] = "/inference.GRPCInferenceService/ModelStreamInfer";
namespace {
// A stream's messages read ahead of their answers at most: past it grpc++'s flow control holds the client
// (without it a fast client's messages piled up in the inbox, megabytes a stream, ahead of Python).
const int READ_AHEAD = 256;
}  // namespace

Call::Call(Front *front) : front_(front) {
  ops_[STARTED] = {this, STARTED};
  ops_[READ] = {this, READ};
  ops_[WRITE] = {this, WRITE};
  ops_[FINISH] = {this, FINISH};
  ops_[DONE] = {this, DONE};
  ctx_.AsyncNotifyWhenDone(&ops_[DONE]);
  front->service.RequestCall(&ctx_, &rpc_, front->cq.get(), front->cq.get(), &ops_[STARTED]);
}

void Call::completed(OpKind kind, bool ok) {
  if (kind == STARTED) return started(ok);
  if (kind == READ) return read_done(ok);
  if (kind == WRITE) return write_done(ok);
  bool over;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (kind == FINISH) {
      finishing_ = false;
    } else {  // DONE: finished, or cancelled (the client went away, the server stopped): nothing more goes out
      done_ = true;
      finished_ = true;
      out_.erase(out_.begin() + (writing_ ? 1 : 0), out_.end());
    }
    over = over_locked();
  }
  if (over) end();
}

void Call::started(bool ok) {
  if (!ok) {  // the server is stopping: this call never began, so its done notification never comes
    delete this;
    return;
  }
  {
    std::lock_guard<std::mutex> lock(front_->accept_mu);
    if (!front_->stopping) new Call(front_);
  }
  id_ = front_->next_id++;
  stream_ = ctx_.method() == STREAM_METHOD;
  {
    std::lock_guard<std::mutex> lock(front_->registry_mu);
    front_->calls[id_] = this;
  }
  bool over;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    start_read_locked();  // (nothing, if the call was cancelled before this: then it is over already)
    over = over_locked();
  }
  if (over) end();
}

void Call::end() {
  {
    std::lock_guard<std::mutex> lock(front_->registry_mu);
    front_->calls.erase(id_);
  }
  if (sent_metadata_)  // Python forgets it (and cancels its work); a call only lanes answered, it never knew
    front_->inbox.push(Inbound{id_, CALL_ENDED, {}, {}, {}});
  delete this;
}

bool Call::reading_held() const { return paused_ || lane_holds_ > 0 || unanswered_ >= READ_AHEAD; }

void Call::start_read_locked() {
  if (finished_ || reading_) return;
  if (reading_held()) {
    read_waiting_ = true;
    return;
  }
  read_waiting_ = false;
  reading_ = true;
  rpc_.Read(&in_, &ops_[READ]);
}

void Call::read_done(bool ok) {
  bool over;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    reading_ = false;
    if (!finished_) take_locked(ok);
    over = over_locked();
  }
  if (over) end();
}

void Call::take_locked(bool ok) {
  if (!ok) {  // the client half-closed (or the call broke): a unary call without its request is refused
    if (stream_) {
      front_->inbox.push(Inbound{id_, STREAM_CLOSED, {}, {}, {}});
    } else if (!answered_) {
      finish_locked(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message"));
    }
    return;
  }
  Inbound item{id_, stream_ ? STREAM_MESSAGE : UNARY, {}, {}, {}};
  std::vector<grpc::Slice> slices;
  if (in_.Dump(&slices).ok()) {
    size_t size = 0;
    for (auto &s : slices) size += s.size();
    item.payload.reserve(size);
    for (auto &s : slices) item.payload.append(reinterpret_cast<const char *>(s.begin()), s.size());
  }
  in_.Clear();
  if (front_->lanes) {  // a lane's session message is answered without Python
    std::string logged_id;
    if (!stream_) {  // (a stream's messages are named by their own ids, as on the Python path)
      auto header = ctx_.client_metadata().find("x-request-id");
      if (header != ctx_.client_metadata().end()) logged_id.assign(header->second.data(), header->second.size());
    }
    Offer offer = lanes_offer(front_->lanes, id_, stream_, item.payload, logged_id);
    if (offer.what == Offer::FAILED) return fail(offer.code, offer.message);
    if (offer.step) front_->step_soon(offer.step);
    if (offer.what != Offer::PYTHON) {
      if (!stream_) return;  // (a unary call reads nothing more)
      unanswered_++;
      if (offer.hold) lane_holds_++;
      if (offer.what == Offer::ANSWERED) write(offer.answer.data(), offer.answer.size(), false);
      return start_read_locked();
    }
  }
  if (!sent_metadata_) {  // the call's method and metadata travel with its first message only
    sent_metadata_ = true;
    item.method = std::string(ctx_.method());
    for (auto &kv : ctx_.client_metadata())
      item.metadata.emplace_back(std::string(kv.first.data(), kv.first.size()),
                                 std::string(kv.second.data(), kv.second.size()));
  }
  front_->inbox.push(std::move(item));
  if (stream_) {  // a unary call's one message is all it reads
    unanswered_++;
    start_read_locked();
  }
}

void Call::write(const char *data, size_t size, bool last) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (finished_ || (!stream_ && answered_)) return;
  answered_ = true;
  grpc::Slice slice(data, size);
  out_.emplace_back(&slice, 1);
  if (last && !writing_) {  // the answer and the status in one batch
    finished_ = true;
    finishing_ = true;
    rpc_.WriteAndFinish(out_.back(), grpc::WriteOptions(), grpc::Status::OK, &ops_[FINISH]);
    return;
  }
  if (last) finish_after_writes_ = true;
  if (!writing_) start_write_locked();
  if (stream_) --unanswered_;
  if (stream_ && read_waiting_) start_read_locked();
}

void Call::start_write_locked() {  // all but the last of a burst may wait in grpc's buffer: a few sends, not one each
  writing_ = true;
  grpc::WriteOptions options;
  if (out_.size() > 1) options.set_buffer_hint();
  rpc_.Write(out_.front(), options, &ops_[WRITE]);
}

void Call::write_done(bool ok) {
  bool over;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (!out_.empty()) out_.pop_front();
    writing_ = false;
    if (finish_waits_) {  // a status was decided while this write was in flight
      send_finish_locked();
    } else if (!finished_) {
      if (!ok) {  // the client is gone
        out_.clear();
        finish_locked(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      } else if (!out_.empty()) {  // answers queued meanwhile
        start_write_locked();
      } else if (finish_after_writes_ && unanswered_ == 0) {
        finish_locked(grpc::Status::OK);
      }
    }
    over = over_locked();
  }
  if (over) end();
}

void Call::fail(grpc::StatusCode code, const std::string &message) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (finished_) return;
  answered_ = true;
  out_.erase(out_.begin() + (writing_ ? 1 : 0), out_.end());
  finish_locked(grpc::Status(code, message));
}

void Call::finish_when_written() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (finished_) return;
  finish_after_writes_ = true;
  if (!writing_ && unanswered_ == 0) finish_locked(grpc::Status::OK);
}

void Call::pause() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  paused_ = true;
}

void Call::resume() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  paused_ = false;
  if (read_waiting_) start_read_locked();
}

void Call::release_hold() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (lane_holds_ > 0) lane_holds_--;
  if (read_waiting_) start_read_locked();
}

// The status goes out after the write in flight (grpc takes one write at a time, and the status after it).
void Call::finish_locked(const grpc::Status &status) {
  finished_ = true;
  status_ = status;
  if (writing_) {
    finish_waits_ = true;
  } else {
    send_finish_locked();
  }
}

void Call::send_finish_locked() {
  finish_waits_ = false;
  if (done_) return;  // cancelled meanwhile: no status to send
  finishing_ = true;
  rpc_.Finish(status_, &ops_[FINISH]);
}

// --- Python face --------------------------------------------------------------------------------------

struct FrontObject {
  PyObject_HEAD
  Front *front;
  int port;
};

PyObject *front_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
  static const char *kw[] = {"address", "max_message_bytes", "key", "cert", "ca", nullptr};
  const char *address, *key = nullptr, *cert = nullptr, *ca = nullptr;
  int max_bytes;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "zi|zzz", const_cast<char **>(kw), &address, &max_bytes, &key,
                                   &cert, &ca))
    return nullptr;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (key && cert) {
    grpc::SslServerCredentialsOptions options(ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                                 : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    options.pem_key_cert_pairs.push_back({key, cert});
    if (ca) options.pem_root_certs = ca;
    credentials = grpc::SslServerCredentials(options);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  auto self = reinterpret_cast<FrontObject *>(type->tp_alloc(type, 0));
  if (!self) return nullptr;
  self->front = new Front();
#ifdef CELLSERVE_LANES
  self->front->lanes = lanes_new(self->front);
#endif
  self->port = 0;
  if (!address) return reinterpret_cast<PyObject *>(self);  // lanes and HTTP only: no gRPC port
  // Debian builds Abseil without NDEBUG, so each absl::Mutex lock that grpc++ takes also walks a lock-order
  // graph for deadlock detection (GraphCycles::GetId in profiles); this is a server, not a test of Abseil
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials, &self->port);
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  builder.RegisterAsyncGenericService(&self->front->service);
  Front *front = self->front;
  front->cq = builder.AddCompletionQueue();
  Py_BEGIN_ALLOW_THREADS
  front->server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!front->server || self->port == 0) {
    PyErr_Format(PyExc_OSError, "cannot listen for gRPC on %s", address);
    Py_DECREF(self);
    return nullptr;
  }
  front->kick = std::make_unique<grpc::Alarm>();
  new Call(front);  // the first call; each call that starts asks for the next
  front->poller = std::thread([front] {
    pthread_setname_np(pthread_self(), "cs-grpc");  // for top -H, perf and py-spy
    void *tag;
    bool ok;
    while (true) {
      if (front->stepping.empty()) {
        if (!front->cq->Next(&tag, &ok)) break;
      } else {  // completions first; a step of the lanes' loops whenever none is waiting
        auto got = front->cq->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
        if (got == grpc::CompletionQueue::SHUTDOWN) break;
        if (got == grpc::CompletionQueue::TIMEOUT) {
          token_lanes_step(front->stepping);
          continue;
        }
      }
      auto *op = static_cast<Call::Op *>(tag);
      if (!op->call) {
        front->write_outbox();
        continue;
      }
      op->call->completed(op->kind, ok);
    }
  });
  return reinterpret_cast<PyObject *>(self);
}

// A lane's answers are written by the poller, which reads the requests too, not by the step loop's worker that
// made them: the worker goes back to stepping, and the poller writes the answers of a step together, as a
// bare grpc++ server answering on its completion queue's thread does (15-21 us of server CPU per echo at
// 16 clients, against 28-30 when a second thread writes). Measured, speller over gRPC, two servers side by
// side (6-8 alternating rounds): 64 -> 45 us outside the kernels per request at 16 clients, 212 -> 157 at
// one, p50 0.49 -> 0.38 ms there. The poller is woken by an alarm already due (grpc queues it at once), set
// once per burst.
void Front::post(uint64_t call, std::string &&bytes, bool last) {
  std::lock_guard<std::mutex> lock(outbox_mu);
  if (!outbox_open || !kick) return;  // the queue has shut down (every call is over), or there never was one
  outbox.push_back(Outgoing{call, std::move(bytes), last});
  if (!outbox_kicked) {
    outbox_kicked = true;
    kick->Set(cq.get(), gpr_time_0(GPR_CLOCK_MONOTONIC), &kick_op);
  }
}

void Front::step_soon(TokenLane *lane) {
  if (std::find(stepping.begin(), stepping.end(), lane) == stepping.end()) stepping.push_back(lane);
}

void Front::write_outbox() {
  std::vector<Outgoing> out;
  {
    std::lock_guard<std::mutex> lock(outbox_mu);
    out.swap(outbox);
    outbox_kicked = false;
  }
  for (auto &o : out) with_call(o.call, [&](Call *c) { c->write(o.bytes.data(), o.bytes.size(), o.last); });
}

void shutdown(Front *front, double grace_s) {
#ifdef CELLSERVE_HTTP
  if (front->http) http_stop(front->http, grace_s);
#endif
  if (front->server) {
    {
      std::lock_guard<std::mutex> lock(front->accept_mu);
      front->stopping = true;
    }
    // Calls still open at the deadline are cancelled; their completions come to the poller, which deletes
    // each call once it is over. Only then may the queue shut down: an operation started on a queue that
    // has shut down is a fatal error in grpc.
    front->server->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
    front->server->Wait();
    for (int waited_ms = 0; waited_ms < 10000; waited_ms++) {
      {
        std::lock_guard<std::mutex> lock(front->registry_mu);
        if (front->calls.empty()) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    {
      std::lock_guard<std::mutex> lock(front->outbox_mu);
      front->outbox_open = false;
    }
    front->cq->Shutdown();
    front->poller.join();
    front->kick.reset();
    front->server.reset();
  }
  if (front->lanes) lanes_stop(front->lanes);
  std::lock_guard<std::mutex> lock(front->inbox.mu);
  front->inbox.stopped = true;
  front->inbox.cv.notify_all();
}

void front_dealloc(FrontObject *self) {
  if (self->front) {
    Py_BEGIN_ALLOW_THREADS
    shutdown(self->front, 0.0);
    Py_END_ALLOW_THREADS
    if (self->front->lanes) lanes_delete(self->front->lanes);
#ifdef CELLSERVE_HTTP
    if (self->front->http) http_delete(self->front->http);
#endif
    delete self->front;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject *>(self));
}

// take(timeout_s) -> [(call, kind, method, payload, metadata)], or None once the server has stopped.
PyObject *front_take(FrontObject *self, PyObject *arg) {
  double timeout = PyFloat_AsDouble(arg);
  if (timeout == -1.0 && PyErr_Occurred()) return nullptr;
  std::vector<Inbound> items;
  bool stopped;
  Inbox &inbox = self->front->inbox;
  Py_BEGIN_ALLOW_THREADS {
    std::unique_lock<std::mutex> lock(inbox.mu);
    inbox.cv.wait_for(lock, std::chrono::duration<double>(timeout),
                      [&] { return !inbox.items.empty() || inbox.stopped; });
    items.swap(inbox.items);
    stopped = inbox.stopped;
  }
  Py_END_ALLOW_THREADS
  if (items.empty() && stopped) Py_RETURN_NONE;
  PyObject *list = PyList_New(static_cast<Py_ssize_t>(items.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    Inbound &item = items[i];
    PyObject *metadata = PyTuple_New(static_cast<Py_ssize_t>(item.metadata.size()));
    if (!metadata) {
      Py_DECREF(list);
      return nullptr;
    }
    for (size_t j = 0; j < item.metadata.size(); ++j) {
      PyObject *pair = Py_BuildValue("(s#y#)", item.metadata[j].first.data(),
                                     static_cast<Py_ssize_t>(item.metadata[j].first.size()),
                                     item.metadata[j].second.data(),
                                     static_cast<Py_ssize_t>(item.metadata[j].second.size()));
      if (!pair) {
        Py_DECREF(metadata);
        Py_DECREF(list);
        return nullptr;
      }
      PyTuple_SET_ITEM(metadata, static_cast<Py_ssize_t>(j), pair);
    }
    PyObject *tuple = Py_BuildValue("(Kis#y#N)", static_cast<unsigned long long>(item.call), item.kind,
                                    item.method.data(), static_cast<Py_ssize_t>(item.method.size()),
                                    item.payload.data(), static_cast<Py_ssize_t>(item.payload.size()), metadata);
    if (!tuple) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), tuple);
  }
  return list;
}

PyObject *front_reply(FrontObject *self, PyObject *args) {
  unsigned long long call;
  Py_buffer data;
  int last = 1;
  if (!PyArg_ParseTuple(args, "Ky*|p", &call, &data, &last)) return nullptr;
  const char *bytes = static_cast<const char *>(data.buf);
  size_t size = static_cast<size_t>(data.len);
  bool live;
  Py_BEGIN_ALLOW_THREADS
  live = self->front->with_call(call, [&](Call *c) { c->write(bytes, size, last); });
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  return PyBool_FromLong(live);
}

PyObject *front_fail(FrontObject *self, PyObject *args) {
  unsigned long long call;
  int code;
  const char *message;
  Py_ssize_t length;
  if (!PyArg_ParseTuple(args, "Kis#", &call, &code, &message, &length)) return nullptr;
  if (code <= 0 || code > 16) {
    PyErr_Format(PyExc_ValueError, "gRPC status code %d is not an error code", code);
    return nullptr;
  }
  std::string text(message, static_cast<size_t>(length));
  Py_BEGIN_ALLOW_THREADS
  self->front->with_call(call, [&](Call *c) { c->fail(static_cast<grpc::StatusCode>(code), text); });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

template <void (Call::*Op)()>
PyObject *front_call_op(FrontObject *self, PyObject *arg) {
  unsigned long long call = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  self->front->with_call(call, [](Call *c) { (c->*Op)(); });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject *front_shutdown(FrontObject *self, PyObject *arg) {
  double grace = PyFloat_AsDouble(arg);
  if (grace == -1.0 && PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  shutdown(self->front, grace);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// wake(): take() returns now (with a WOKEN item), for work Python hands its dispatcher from other threads.
PyObject *front_wake(FrontObject *self, PyObject *) {
  Py_BEGIN_ALLOW_THREADS
  self->front->inbox.push(Inbound{0, WOKEN, {}, {}, {}});
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject *front_add_lane(FrontObject *self, PyObject *args) {
  if (!self->front->lanes) {
    PyErr_SetString(PyExc_RuntimeError, "this build has no stream lanes (the protocol's messages were not generated)");
    return nullptr;
  }
  return lanes_add(self->front->lanes, args);
}

PyObject *front_add_token_lane(FrontObject *self, PyObject *args) {
  if (!self->front->lanes) {
    PyErr_SetString(PyExc_RuntimeError, "this build has no lanes (the protocol's messages were not generated)");
    return nullptr;
  }
  return lanes_add_tokens(self->front->lanes, args);
}

PyObject *front_drain(FrontObject *self, PyObject *) {
  if (self->front->lanes) {
    Py_BEGIN_ALLOW_THREADS
    lanes_drain(self->front->lanes);
    Py_END_ALLOW_THREADS
  }
  Py_RETURN_NONE;
}

PyObject *front_flush_lanes(FrontObject *self, PyObject *) {
  if (self->front->lanes) lanes_flush(self->front->lanes);
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_NONE;
}

PyObject *front_lane_sessions(FrontObject *self, PyObject *arg) {
  const char *model = PyUnicode_AsUTF8(arg);
  if (!model) return nullptr;
  long count = -1;
  if (self->front->lanes) {
    std::string name(model);
    Py_BEGIN_ALLOW_THREADS
    count = lanes_sessions(self->front->lanes, name);
    Py_END_ALLOW_THREADS
  }
  return PyLong_FromLong(count);
}

PyObject *front_get_port(FrontObject *self, void *) { return PyLong_FromLong(self->port); }

// serve_http(host, port, upstream, max_body_bytes, id_prefix, key=None, cert=None, ca=None) -> the bound port
PyObject *front_serve_http(FrontObject *self, PyObject *args, PyObject *kwargs) {
#ifdef CELLSERVE_HTTP
  static const char *kw[] = {"host", "port", "upstream", "max_body_bytes", "id_prefix", "key", "cert", "ca", nullptr};
  const char *host, *upstream, *prefix, *key = nullptr, *cert = nullptr, *ca = nullptr;
  int port;
  Py_ssize_t max_body;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sisns|zzz", const_cast<char **>(kw), &host, &port, &upstream,
                                   &max_body, &prefix, &key, &cert, &ca))
    return nullptr;
  if (self->front->http) {
    PyErr_SetString(PyExc_RuntimeError, "serve_http: this front serves HTTP already");
    return nullptr;
  }
  if (max_body < 1) {
    PyErr_SetString(PyExc_ValueError, "serve_http: max_body_bytes must be positive");
    return nullptr;
  }
  std::string error;
  HttpFront *http;
  Py_BEGIN_ALLOW_THREADS
  http = http_new(self->front->lanes, host, port, upstream, static_cast<size_t>(max_body), prefix, key, cert, ca, error);
  Py_END_ALLOW_THREADS
  if (!http) {
    PyErr_SetString(PyExc_OSError, error.c_str());
    return nullptr;
  }
  self->front->http = http;
  return PyLong_FromLong(http_port(http));
#else
  PyErr_SetString(PyExc_RuntimeError, "this build has no native HTTP front end (Boost or RapidJSON was missing)");
  return nullptr;
#endif
}

PyObject *front_http_drain(FrontObject *self, PyObject *) {
#ifdef CELLSERVE_HTTP
  if (self->front->http) http_drain(self->front->http);
#endif
  Py_RETURN_NONE;
}

PyMethodDef front_methods[] = {
    {"take", reinterpret_cast<PyCFunction>(front_take), METH_O,
     "take(timeout_s): the messages that arrived, [(call, kind, method, payload, metadata)]; None once stopped"},
    {"reply", reinterpret_cast<PyCFunction>(front_reply), METH_VARARGS,
     "reply(call, message[, last=True]): write a serialized answer; last finishes a unary call OK"},
    {"fail", reinterpret_cast<PyCFunction>(front_fail), METH_VARARGS, "fail(call, code, message): end with a status"},
    {"finish", reinterpret_cast<PyCFunction>(front_call_op<&Call::finish_when_written>), METH_O,
     "finish(call): end a stream OK once its answers are written"},
    {"pause", reinterpret_cast<PyCFunction>(front_call_op<&Call::pause>), METH_O,
     "pause(call): read no more of a stream until resume"},
    {"resume", reinterpret_cast<PyCFunction>(front_call_op<&Call::resume>), METH_O, "resume(call)"},
    {"wake", reinterpret_cast<PyCFunction>(front_wake), METH_NOARGS, "wake(): take() returns at once"},
    {"add_lane", reinterpret_cast<PyCFunction>(front_add_lane), METH_VARARGS,
     "add_lane(model, version, input, chunk, context, width, max_rows, max_sessions, max_pending_chunks, "
     "idle_timeout_s, outputs, step): answer the model's session messages natively (lanes.cpp)"},
    {"add_token_lane", reinterpret_cast<PyCFunction>(front_add_token_lane), METH_VARARGS,
     "add_token_lane(model, version, loop, spec, record): answer the model's stateless requests natively, on its "
     "engine's step loop (token_lanes.cpp)"},
    {"drain", reinterpret_cast<PyCFunction>(front_drain), METH_NOARGS,
     "drain(): lanes open no new sessions and take no new requests"},
    {"flush_lanes", reinterpret_cast<PyCFunction>(front_flush_lanes), METH_NOARGS,
     "flush_lanes(): the requests token lanes answered, recorded in their statistics now"},
    {"lane_sessions", reinterpret_cast<PyCFunction>(front_lane_sessions), METH_O,
     "lane_sessions(model): the sessions its lane holds (-1: no lane)"},
    {"serve_http", reinterpret_cast<PyCFunction>(front_serve_http), METH_VARARGS | METH_KEYWORDS,
     "serve_http(host, port, upstream, max_body_bytes, id_prefix, key=None, cert=None, ca=None): HTTP/1.1 on "
     "host:port, inference answered by the token lanes, everything else passed to the app on the Unix socket "
     "`upstream`; returns the bound port"},
    {"http_drain", reinterpret_cast<PyCFunction>(front_http_drain), METH_NOARGS,
     "http_drain(): the HTTP port accepts no new connections"},
    {"shutdown", reinterpret_cast<PyCFunction>(front_shutdown), METH_O,
     "shutdown(grace_s): stop listening, let calls finish for grace_s, cancel the rest"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef front_getset[] = {{"port", reinterpret_cast<getter>(front_get_port), nullptr, "the bound port", nullptr},
                              {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject FrontType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_grpc_front",
                          "The gRPC wire in native code (grpc++): messages to Python in batches, answers back by call id.",
                          -1, nullptr};

}  // namespace cellserve_front

using namespace cellserve_front;

PyMODINIT_FUNC PyInit__grpc_front(void) {
  FrontType.tp_name = "cellserve.server.native._grpc_front.Front";
  FrontType.tp_basicsize = sizeof(FrontObject);
  FrontType.tp_flags = Py_TPFLAGS_DEFAULT;
  FrontType.tp_doc = "Front(address, max_message_bytes, key=None, cert=None, ca=None): a listening gRPC server";
  FrontType.tp_new = front_new;
  FrontType.tp_dealloc = reinterpret_cast<destructor>(front_dealloc);
  FrontType.tp_methods = front_methods;
  FrontType.tp_getset = front_getset;
  if (PyType_Ready(&FrontType) < 0) return nullptr;
  PyObject *m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  Py_INCREF(&FrontType);
  if (PyModule_AddObject(m, "Front", reinterpret_cast<PyObject *>(&FrontType)) < 0) {
    Py_DECREF(&FrontType);
    Py_DECREF(m);
    return nullptr;
  }
  PyModule_AddIntConstant(m, "UNARY", UNARY);
  PyModule_AddIntConstant(m, "STREAM_MESSAGE", STREAM_MESSAGE);
  PyModule_AddIntConstant(m, "STREAM_CLOSED", STREAM_CLOSED);
  PyModule_AddIntConstant(m, "CALL_ENDED", CALL_ENDED);
  PyModule_AddIntConstant(m, "WOKEN", WOKEN);
  PyModule_AddIntConstant(m, "RECORDS", RECORDS);
#ifdef CELLSERVE_HTTP
  PyModule_AddIntConstant(m, "HTTP", 1);
#else
  PyModule_AddIntConstant(m, "HTTP", 0);
#endif
#ifdef CELLSERVE_LANES
  PyModule_AddIntConstant(m, "LANES", 1);
#else
  PyModule_AddIntConstant(m, "LANES", 0);
#endif
  return m;
}
