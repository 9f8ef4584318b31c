// A gRPC load generator for the benches, as Triton's perf_analyzer is: messages are encoded by the caller
// before the clock starts, sent from native threads on grpc++'s callback API, and answers are matched by
// their request id (parsed through the protocol's descriptors, which tritonclient ships: as dynamic messages,
// so that no second copy of the generated messages meets the front end's in one process). On 2 shared cores, a client in Python
// (tritonclient, grpc.aio) costs the server as much CPU as it measures; this one costs a few microseconds
// a message.
//
//   unary(address, method, messages, clients, timeout_s): closed loop, `clients` calls in flight; each
//       answer sends the next message. Returns (latency_s per message, NaN where the call failed).
//   stream(address, messages, at_s, timeout_s): one ModelStreamInfer stream; message i is sent at at_s[i]
//       after the start and must carry id str(i). Returns (latency_s from its scheduled time to its answer,
//       NaN where none came; error flags).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/dynamic_message.h>

namespace {

using Clock = std::chrono::steady_clock;

// ModelStreamInferResponse as a dynamic message, from tritonclient's descriptors (set up at import).
struct Protocol {
  google::protobuf::DescriptorPool pool;
  std::unique_ptr<google::protobuf::DynamicMessageFactory> factory;
  const google::protobuf::Message *answer = nullptr;
  const google::protobuf::FieldDescriptor *infer_response, *id, *error_message;
} protocol;

// The descriptors of tritonclient.grpc's model_config_pb2 and service_pb2 into the pool; false with a Python error.
bool load_protocol() {
  for (const char *name : {"tritonclient.grpc.model_config_pb2", "tritonclient.grpc.service_pb2"}) {
    PyObject *module = PyImport_ImportModule(name);
    PyObject *file = module ? PyObject_GetAttrString(module, "DESCRIPTOR") : nullptr;
    PyObject *bytes = file ? PyObject_GetAttrString(file, "serialized_pb") : nullptr;
    Py_XDECREF(module);
    Py_XDECREF(file);
    if (!bytes) return false;
    google::protobuf::FileDescriptorProto proto;
    bool ok = PyBytes_Check(bytes) && proto.ParseFromArray(PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes)) &&
              protocol.pool.BuildFile(proto) != nullptr;
    Py_DECREF(bytes);
    if (!ok) {
      PyErr_Format(PyExc_ImportError, "the protocol's descriptors in %s do not load", name);
      return false;
    }
  }
  const auto *answer = protocol.pool.FindMessageTypeByName("inference.ModelStreamInferResponse");
  const auto *response = protocol.pool.FindMessageTypeByName("inference.ModelInferResponse");
  if (!answer || !response) {
    PyErr_SetString(PyExc_ImportError, "tritonclient's descriptors lack ModelStreamInferResponse");
    return false;
  }
  protocol.factory = std::make_unique<google::protobuf::DynamicMessageFactory>(&protocol.pool);
  protocol.answer = protocol.factory->GetPrototype(answer);
  protocol.infer_response = answer->FindFieldByName("infer_response");
  protocol.error_message = answer->FindFieldByName("error_message");
  protocol.id = response->FindFieldByName("id");
  return true;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

grpc::ByteBuffer buffer_of(const std::string &bytes) {
  grpc::Slice slice(bytes.data(), bytes.size());
  return grpc::ByteBuffer(&slice, 1);
}

std::string string_of(const grpc::ByteBuffer &buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (auto &s : slices) out.append(reinterpret_cast<const char *>(s.begin()), s.size());
  return out;
}

std::shared_ptr<grpc::Channel> channel_to(const std::string &address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// --- closed-loop unary calls ---------------------------------------------------------------------------

struct UnaryRun {
  grpc::GenericStub *stub;
  std::string method;
  const std::vector<std::string> *messages;
  std::vector<double> latency;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
  int timeout_ms;

  struct Call {
    grpc::ClientContext context;
    grpc::ByteBuffer request, response;
    Clock::time_point start;
  };

  void issue() {
    size_t i = next++;
    if (i >= messages->size()) return;
    auto *call = new Call();
    call->request = buffer_of((*messages)[i]);
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
    call->start = Clock::now();
    stub->UnaryCall(&call->context, method, grpc::StubOptions(), &call->request, &call->response,
                    [this, call, i](grpc::Status status) {
                      latency[i] = status.ok() ? seconds_since(call->start) : NAN;
                      delete call;
                      issue();
                      if (++done == messages->size()) {
                        std::lock_guard<std::mutex> lock(mu);
                        cv.notify_all();
                      }
                    });
  }
};

// --- one stream, messages on a schedule ----------------------------------------------------------------

class StreamRun : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamRun(const std::vector<std::string> &messages, const std::vector<double> &at)
      : latency_(messages.size(), NAN), error_(messages.size(), 0), messages_(messages), at_(at) {}

  void run(grpc::GenericStub &stub, double timeout_s) {
    context_.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    stub.PrepareBidiStreamingCall(&context_, "/inference.GRPCInferenceService/ModelStreamInfer",
                                  grpc::StubOptions(), this);
    StartRead(&in_);
    AddHold();  // the writer thread's writes
    StartCall();
    start_ = Clock::now() + std::chrono::milliseconds(200);
    for (size_t i = 0; i < messages_.size(); ++i) {  // on schedule; a late send is measured from its slot
      std::this_thread::sleep_until(start_ + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(at_[i])));
      std::lock_guard<std::mutex> lock(mu_);
      if (ended_) break;
      queue_.push_back(buffer_of(messages_[i]));
      if (!writing_) write_next_locked();
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      writes_closing_ = true;
      if (!writing_) close_writes_locked();
      cv_.wait(lock, [&] { return ended_; });
    }
  }

  std::vector<double> latency_;
  std::vector<char> error_;

 private:
  void write_next_locked() {
    writing_ = true;
    current_ = std::move(queue_.front());
    queue_.pop_front();
    StartWrite(&current_);
  }

  void close_writes_locked() {
    if (!closed_) {
      closed_ = true;
      StartWritesDone();
      RemoveHold();
    }
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      queue_.clear();
      close_writes_locked();
      return;
    }
    if (!queue_.empty()) {
      write_next_locked();
    } else if (writes_closing_) {
      close_writes_locked();
    }
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    double now = std::chrono::duration<double>(Clock::now() - start_).count();
    std::unique_ptr<google::protobuf::Message> answer(protocol.answer->New());
    if (answer->ParseFromString(string_of(in_))) {
      const auto *reflect = answer->GetReflection();
      const std::string id = reflect->GetMessage(*answer, protocol.infer_response).GetReflection()->GetString(
          reflect->GetMessage(*answer, protocol.infer_response), protocol.id);
      char *end = nullptr;
      unsigned long i = std::strtoul(id.c_str(), &end, 10);
      if (!id.empty() && *end == '\0' && i < latency_.size()) {
        latency_[i] = now - at_[i];
        error_[i] = !reflect->GetString(*answer, protocol.error_message).empty();
      }
    }
    in_.Clear();
    StartRead(&in_);
  }

  void OnDone(const grpc::Status &) override {
    std::lock_guard<std::mutex> lock(mu_);
    ended_ = true;
    cv_.notify_all();
  }

  const std::vector<std::string> &messages_;
  const std::vector<double> &at_;
  grpc::ClientContext context_;
  grpc::ByteBuffer in_, current_;
  std::deque<grpc::ByteBuffer> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  Clock::time_point start_;
  bool writing_ = false, writes_closing_ = false, closed_ = false, ended_ = false;
};

// --- Python face ----------------------------------------------------------------------------------------

bool bytes_list(PyObject *obj, std::vector<std::string> &out) {
  PyObject *seq = PySequence_Fast(obj, "messages must be a sequence of bytes");
  if (!seq) return false;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    char *data;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(seq, i), &data, &size) < 0) {
      Py_DECREF(seq);
      return false;
    }
    out.emplace_back(data, static_cast<size_t>(size));
  }
  Py_DECREF(seq);
  return true;
}

PyObject *float_list(const std::vector<double> &values) {
  PyObject *list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyFloat_FromDouble(values[i]));
  return list;
}

PyObject *py_unary(PyObject *, PyObject *args) {
  const char *address, *method;
  PyObject *messages_obj;
  int clients;
  double timeout_s;
  if (!PyArg_ParseTuple(args, "ssOid", &address, &method, &messages_obj, &clients, &timeout_s)) return nullptr;
  std::vector<std::string> messages;
  if (!bytes_list(messages_obj, messages)) return nullptr;
  if (clients < 1) {
    PyErr_SetString(PyExc_ValueError, "clients must be at least 1");
    return nullptr;
  }
  UnaryRun run;
  run.method = method;
  run.messages = &messages;
  run.latency.assign(messages.size(), NAN);
  run.timeout_ms = static_cast<int>(timeout_s * 1000);
  Py_BEGIN_ALLOW_THREADS {
    auto channel = channel_to(address);
    grpc::GenericStub stub(channel);
    run.stub = &stub;
    if (!messages.empty()) {
      for (int c = 0; c < clients; ++c) run.issue();
      std::unique_lock<std::mutex> lock(run.mu);
      run.cv.wait(lock, [&] { return run.done.load() == messages.size(); });
    }
  }
  Py_END_ALLOW_THREADS
  return float_list(run.latency);
}

PyObject *py_stream(PyObject *, PyObject *args) {
  const char *address;
  PyObject *messages_obj, *at_obj;
  double timeout_s;
  if (!PyArg_ParseTuple(args, "sOOd", &address, &messages_obj, &at_obj, &timeout_s)) return nullptr;
  std::vector<std::string> messages;
  if (!bytes_list(messages_obj, messages)) return nullptr;
  PyObject *seq = PySequence_Fast(at_obj, "at_s must be a sequence of floats");
  if (!seq) return nullptr;
  std::vector<double> at;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) at.push_back(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i)));
  Py_DECREF(seq);
  if (PyErr_Occurred()) return nullptr;
  if (at.size() != messages.size()) {
    PyErr_SetString(PyExc_ValueError, "at_s must give one time per message");
    return nullptr;
  }
  auto *run = new StreamRun(messages, at);
  Py_BEGIN_ALLOW_THREADS {
    auto channel = channel_to(address);
    grpc::GenericStub stub(channel);
    run->run(stub, timeout_s);
  }
  Py_END_ALLOW_THREADS
  PyObject *latency = float_list(run->latency_);
  PyObject *errors = PyList_New(static_cast<Py_ssize_t>(run->error_.size()));
  for (size_t i = 0; errors && i < run->error_.size(); ++i)
    PyList_SET_ITEM(errors, static_cast<Py_ssize_t>(i), PyBool_FromLong(run->error_[i]));
  delete run;
  if (!latency || !errors) {
    Py_XDECREF(latency);
    Py_XDECREF(errors);
    return nullptr;
  }
  return Py_BuildValue("(NN)", latency, errors);
}

PyMethodDef methods[] = {
    {"unary", py_unary, METH_VARARGS,
     "unary(address, method, messages, clients, timeout_s): closed-loop calls; latency (s) per message, NaN if failed"},
    {"stream", py_stream, METH_VARARGS,
     "stream(address, messages, at_s, timeout_s): one ModelStreamInfer stream on a schedule; (latencies, errors)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_loadgen", "A native gRPC load generator for the benches.", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__loadgen(void) { return load_protocol() ? PyModule_Create(&module_def) : nullptr; }
