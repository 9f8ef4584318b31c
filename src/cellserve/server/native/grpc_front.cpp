// The gRPC wire in native code: HTTP/2, framing, flow control, TLS and message limits are grpc++'s (the
// distribution's libgrpc++), on its callback API with one generic service, so every method of
// inference.GRPCInferenceService arrives here as bytes. Each call's messages go to one inbox that Python
// drains in batches (take: one GIL acquisition for every message that arrived meanwhile, never a task or a
// thread switch per message); Python's answers come back by call id (reply / fail / finish) and are written
// from here. A stream is read ahead until Python pauses it (flow control), and its answers are queued and
// written one at a time, as grpc's reactors require.
//
// Lifetime: a Call is a reactor, deleted in OnDone. Every operation on it runs under its own (recursive:
// grpc may run a reaction inline) mutex and checks `finished`; OnDone comes only after Finish, which is
// called under that mutex, so Python's late answers (the client gone) find the call finished, or absent from
// the registry, and are dropped.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_callback.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

const char STREAM_METHOD[] = "/inference.GRPCInferenceService/ModelStreamInfer";
// A stream's messages read ahead of their answers at most: past it grpc++'s flow control holds the client
// (without it a fast client's messages piled up in the inbox, megabytes a stream, ahead of Python).
const int READ_AHEAD = 256;
enum Kind { UNARY = 0, STREAM_MESSAGE = 1, STREAM_CLOSED = 2, CALL_ENDED = 3, WOKEN = 4 };

struct Inbound {
  uint64_t call;
  int kind;
  std::string method, payload;
  std::vector<std::pair<std::string, std::string>> metadata;  // a call's first message only
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

struct Front;

class Call : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  Call(Front *front, grpc::GenericCallbackServerContext *ctx, uint64_t id);
  void start();
  void write(const char *data, size_t size, bool last);  // last: finish OK after it (a unary answer)
  void fail(grpc::StatusCode code, const std::string &message);
  void finish_when_written();  // a stream: finish OK once the queued answers are out
  void pause();
  void resume();

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  void finish_locked(const grpc::Status &status);
  void read_next_locked();
  void end(bool cancelled);

  Front *front_;
  grpc::GenericCallbackServerContext *ctx_;
  uint64_t id_;
  bool stream_;
  std::recursive_mutex mu_;
  grpc::ByteBuffer in_;
  std::deque<grpc::ByteBuffer> out_;
  bool writing_ = false, finished_ = false, finish_after_writes_ = false, paused_ = false, read_waiting_ = false;
  bool answered_ = false, sent_metadata_ = false;
  int unanswered_ = 0;  // a stream's messages read and not answered yet
};

struct Front : grpc::CallbackGenericService {
  Inbox inbox;
  std::mutex registry_mu;
  std::unordered_map<uint64_t, Call *> calls;
  std::atomic<uint64_t> next_id{1};
  std::unique_ptr<grpc::Server> server;

  grpc::ServerGenericBidiReactor *CreateReactor(grpc::GenericCallbackServerContext *ctx) override {
    uint64_t id = next_id++;
    Call *call = new Call(this, ctx, id);
    {
      std::lock_guard<std::mutex> lock(registry_mu);
      calls[id] = call;
    }
    call->start();
    return call;
  }

  // Runs `op` on a live call under the registry lock (so the call cannot be deleted meanwhile); false when
  // the call is gone.
  template <class Op>
  bool with_call(uint64_t id, Op op) {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = calls.find(id);
    if (it == calls.end()) return false;
    op(it->second);
    return true;
  }
};

Call::Call(Front *front, grpc::GenericCallbackServerContext *ctx, uint64_t id)
    : front_(front), ctx_(ctx), id_(id), stream_(ctx->method() == STREAM_METHOD) {}

void Call::start() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  StartRead(&in_);
}

void Call::read_next_locked() {
  if (paused_ || unanswered_ >= READ_AHEAD) {
    read_waiting_ = true;
  } else {
    StartRead(&in_);
  }
}

void Call::OnReadDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (finished_) return;
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
  if (!sent_metadata_) {  // the call's method and metadata travel with its first message only
    sent_metadata_ = true;
    item.method = std::string(ctx_->method());
    for (auto &kv : ctx_->client_metadata())
      item.metadata.emplace_back(std::string(kv.first.data(), kv.first.size()),
                                 std::string(kv.second.data(), kv.second.size()));
  }
  front_->inbox.push(std::move(item));
  if (stream_) {  // a unary call's one message is all it reads
    unanswered_++;
    read_next_locked();
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
    StartWriteAndFinish(&out_.back(), grpc::WriteOptions(), grpc::Status::OK);
    return;
  }
  if (last) finish_after_writes_ = true;
  if (!writing_) {
    writing_ = true;
    StartWrite(&out_.front());
  }
  if (stream_ && --unanswered_ < READ_AHEAD && read_waiting_ && !paused_) {
    read_waiting_ = false;
    StartRead(&in_);
  }
}

void Call::OnWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (!out_.empty()) out_.pop_front();
  writing_ = false;
  if (finished_) return;
  if (!ok) {  // the client is gone
    out_.clear();
    finish_locked(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  } else if (!out_.empty()) {
    writing_ = true;
    StartWrite(&out_.front());
  } else if (finish_after_writes_) {
    finish_locked(grpc::Status::OK);
  }
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
  if (!writing_) finish_locked(grpc::Status::OK);
}

void Call::pause() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  paused_ = true;
}

void Call::resume() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  paused_ = false;
  if (read_waiting_ && !finished_ && unanswered_ < READ_AHEAD) {
    read_waiting_ = false;
    StartRead(&in_);
  }
}

void Call::finish_locked(const grpc::Status &status) {
  finished_ = true;
  Finish(status);
}

void Call::OnCancel() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (!finished_) finish_locked(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
}

void Call::OnDone() {
  {
    std::lock_guard<std::mutex> lock(front_->registry_mu);
    front_->calls.erase(id_);
  }
  front_->inbox.push(Inbound{id_, CALL_ENDED, {}, {}, {}});  // Python forgets it (and cancels its work)
  delete this;
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
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "si|zzz", const_cast<char **>(kw), &address, &max_bytes, &key,
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
  self->port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials, &self->port);
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  builder.RegisterCallbackGenericService(self->front);
  Py_BEGIN_ALLOW_THREADS
  self->front->server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!self->front->server || self->port == 0) {
    PyErr_Format(PyExc_OSError, "cannot listen for gRPC on %s", address);
    Py_DECREF(self);
    return nullptr;
  }
  return reinterpret_cast<PyObject *>(self);
}

void shutdown(Front *front, double grace_s) {
  if (front->server) {
    front->server->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
    front->server->Wait();
    front->server.reset();
  }
  std::lock_guard<std::mutex> lock(front->inbox.mu);
  front->inbox.stopped = true;
  front->inbox.cv.notify_all();
}

void front_dealloc(FrontObject *self) {
  if (self->front) {
    Py_BEGIN_ALLOW_THREADS
    shutdown(self->front, 0.0);
    Py_END_ALLOW_THREADS
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

PyObject *front_get_port(FrontObject *self, void *) { return PyLong_FromLong(self->port); }

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
    {"shutdown", reinterpret_cast<PyCFunction>(front_shutdown), METH_O,
     "shutdown(grace_s): stop listening, let calls finish for grace_s, cancel the rest"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef front_getset[] = {{"port", reinterpret_cast<getter>(front_get_port), nullptr, "the bound port", nullptr},
                              {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject FrontType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_grpc_front",
                          "The gRPC wire in native code (grpc++): messages to Python in batches, answers back by call id.",
                          -1, nullptr};

}  // namespace

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
  return m;
}
