// A WebSocket load generator for `bench streams` (the cellular-ws deployment): one connection per stream,
// each message a binary frame prepared by the caller before the clock starts and sent at its scheduled time
// from one native thread (Boost.Beast over Asio). On 2 shared cores an asyncio client costs about 100 us of
// CPU a message, as much as the server it measures; this one costs a few.
//
//   run(host, port, targets, messages, at_s, timeout_s): targets[s] is stream s's path (with its query),
//       messages[s] its frames, at_s[s] their times after the start. Answers come in order on a connection;
//       a message's latency runs from its scheduled time to its answer. Returns (latencies, errors) flat in
//       stream order: NaN where no answer came, error where the answer was a text message ({"error": ...}).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Stream {
  std::string target;
  std::vector<std::string> messages;
  std::vector<double> at;
  std::vector<double> latency;
  std::vector<char> error;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(asio::io_context &io, Stream &stream, Clock::time_point start)
      : ws_(io), timer_(io), stream_(stream), start_(start) {}

  websocket::stream<beast::tcp_stream> &ws() { return ws_; }

  void begin() {
    ws_.binary(true);
    ws_.auto_fragment(false);
    schedule();
    read();
  }

  void stop() {
    beast::error_code ignored;
    timer_.cancel();
    beast::get_lowest_layer(ws_).socket().close(ignored);
  }

 private:
  Clock::time_point due(size_t k) const {
    return start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(stream_.at[k]));
  }

  void schedule() {
    if (next_send_ >= stream_.messages.size()) return;
    timer_.expires_at(due(next_send_));
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;
      self->send();
    });
  }

  void send() {
    if (writing_) return;  // (the write under way sends it when done)
    const size_t k = next_send_++;
    writing_ = true;
    ws_.async_write(asio::buffer(stream_.messages[k]), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) return;
      if (self->next_send_ < self->stream_.messages.size() && Clock::now() >= self->due(self->next_send_))
        return self->send();  // (late: no wait)
      self->schedule();
    });
  }

  void read() {
    if (next_answer_ >= stream_.messages.size()) {
      return ws_.async_close(websocket::close_code::normal, [self = shared_from_this()](beast::error_code) {});
    }
    ws_.async_read(buffer_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return;
      const size_t k = self->next_answer_++;
      self->stream_.latency[k] = std::chrono::duration<double>(Clock::now() - self->due(k)).count();
      self->stream_.error[k] = self->ws_.got_text();
      self->buffer_.clear();
      self->read();
    });
  }

  websocket::stream<beast::tcp_stream> ws_;
  asio::steady_timer timer_;
  Stream &stream_;
  Clock::time_point start_;
  beast::flat_buffer buffer_;
  size_t next_send_ = 0, next_answer_ = 0;
  bool writing_ = false;
};

// Every stream's connection opened (before the clock), then the schedule run until all answers came or the
// timeout passed.
std::string run(const std::string &host, int port, std::vector<Stream> &streams, double timeout_s) {
  asio::io_context io(1);
  const auto start = Clock::now() + std::chrono::milliseconds(200 + static_cast<int>(streams.size() / 4));
  std::vector<std::shared_ptr<Connection>> connections;
  try {
    tcp::resolver resolver(io);
    const auto where = resolver.resolve(host, std::to_string(port));
    for (auto &stream : streams) {
      auto c = std::make_shared<Connection>(io, stream, start);
      beast::get_lowest_layer(c->ws()).connect(where);
      beast::get_lowest_layer(c->ws()).socket().set_option(tcp::no_delay(true));
      c->ws().handshake(host, stream.target);
      connections.push_back(std::move(c));
    }
  } catch (const std::exception &e) {
    return std::string("cannot open the WebSocket streams: ") + e.what();
  }
  for (auto &c : connections) c->begin();
  asio::steady_timer deadline(io);
  double last = 0;
  for (auto &s : streams)
    for (double at : s.at) last = std::max(last, at);  // (the deadline: the last send, plus timeout_s)
  deadline.expires_at(start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(last + timeout_s)));
  deadline.async_wait([&](beast::error_code ec) {
    if (ec) return;
    for (auto &c : connections) c->stop();
  });
  io.run_for(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(last + timeout_s + 5)));
  return "";
}

bool read_list(PyObject *obj, const char *what, std::vector<PyObject *> &out) {
  PyObject *seq = PySequence_Fast(obj, what);
  if (!seq) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) out.push_back(PySequence_Fast_GET_ITEM(seq, i));
  Py_DECREF(seq);  // (the items stay: the caller's lists hold them)
  return true;
}

PyObject *py_run(PyObject *, PyObject *args) {
  const char *host;
  int port;
  PyObject *targets, *messages, *ats;
  double timeout_s;
  if (!PyArg_ParseTuple(args, "siOOOd", &host, &port, &targets, &messages, &ats, &timeout_s)) return nullptr;
  std::vector<PyObject *> t, m, a;
  if (!read_list(targets, "targets: a path per stream", t) || !read_list(messages, "messages: frames per stream", m) ||
      !read_list(ats, "at_s: times per stream", a))
    return nullptr;
  if (t.size() != m.size() || t.size() != a.size()) {
    PyErr_SetString(PyExc_ValueError, "targets, messages and at_s give one entry per stream");
    return nullptr;
  }
  std::vector<Stream> streams(t.size());
  for (size_t s = 0; s < t.size(); ++s) {
    const char *target = PyUnicode_AsUTF8(t[s]);
    if (!target) return nullptr;
    streams[s].target = target;
    std::vector<PyObject *> frames, times;
    if (!read_list(m[s], "a stream's frames", frames) || !read_list(a[s], "a stream's times", times)) return nullptr;
    if (frames.size() != times.size()) {
      PyErr_SetString(PyExc_ValueError, "each frame needs its time");
      return nullptr;
    }
    for (size_t k = 0; k < frames.size(); ++k) {
      char *data;
      Py_ssize_t size;
      if (PyBytes_AsStringAndSize(frames[k], &data, &size) < 0) return nullptr;
      streams[s].messages.emplace_back(data, size);
      streams[s].at.push_back(PyFloat_AsDouble(times[k]));
    }
    if (PyErr_Occurred()) return nullptr;
    streams[s].latency.assign(frames.size(), NAN);
    streams[s].error.assign(frames.size(), 0);
  }
  std::string failed;
  Py_BEGIN_ALLOW_THREADS
  failed = run(host, port, streams, timeout_s);
  Py_END_ALLOW_THREADS
  if (!failed.empty()) {
    PyErr_SetString(PyExc_ConnectionError, failed.c_str());
    return nullptr;
  }
  PyObject *latency = PyList_New(0), *errors = PyList_New(0);
  for (const auto &s : streams)
    for (size_t k = 0; latency && errors && k < s.latency.size(); ++k) {
      PyObject *value = PyFloat_FromDouble(s.latency[k]);
      PyList_Append(latency, value);
      Py_XDECREF(value);
      PyList_Append(errors, s.error[k] ? Py_True : Py_False);
    }
  return Py_BuildValue("(NN)", latency, errors);
}

PyMethodDef methods[] = {
    {"run", py_run, METH_VARARGS,
     "run(host, port, targets, messages, at_s, timeout_s): WebSocket streams on a schedule; (latencies, errors)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_wsload", "A native WebSocket load generator for the benches.", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__wsload(void) { return PyModule_Create(&module_def); }
