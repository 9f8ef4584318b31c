// WebSocket sessions on a stream lane, without Python per binary message: the native HTTP front end
// (http_front.cpp) hands over an upgrade to /v2/models/{name}/stream that a lane serves, and this file
// serves the connection as the Python front end does (websocket.py, the reference):
//
// - one connection is one session, named by ?sequence_id= or here (X-Sequence-Id says which); its first good
//   message opens it; closing the connection ends it (once its message in a step is answered), and Python
//   remembers why for a later message naming it;
// - a binary message is whole chunks of the lane's FP32 input, admitted into the lane's sessions and steps as
//   gRPC's are (stream_lanes.h); its answer is the raw bytes of the output asked for;
// - a text message is a KServe v2 JSON request, read and answered by the lane's Python step object, one call
//   each way (read_text, answer_text), so that it is taken and worded exactly as on the Python front end;
// - a bad message gets {"error": ...} and the session goes on; answers go out in arrival order;
// - flow control: while max_pending_chunks of the connection's chunks are unanswered, nothing more is read.
//
// The frames are Boost.Beast's; everything runs on the HTTP front end's io thread, and the lanes' answers are
// posted to it.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "websocket_front.h"

#include <boost/asio.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>

#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <vector>

#include "stream_lanes.h"

namespace cellserve_front {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;

namespace {

const char PROTOCOL[] = "websocket";  // (the access log's name, as the Python front end's)

// A Python object a session keeps (a text message's parsed request), released with the GIL wherever the
// session ends (the io thread, or the front's deletion, which holds it).
struct PyRef {
  PyObject *obj = nullptr;
  PyRef() = default;
  explicit PyRef(PyObject *o) : obj(o) {}
  PyRef(const PyRef &) = delete;
  PyRef &operator=(const PyRef &) = delete;
  ~PyRef() {
    if (!obj) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_DECREF(obj);
    PyGILState_Release(gil);
  }
};

// The server's name for an unnamed session: 32 hex digits, as Python's uuid4().hex.
std::string new_sid() {
  static thread_local std::mt19937_64 random{std::random_device{}()};
  char digits[33];
  snprintf(digits, sizeof digits, "%016llx%016llx", static_cast<unsigned long long>(random()),
           static_cast<unsigned long long>(random()));
  return digits;
}

// One answer, in arrival order: ready once its bytes are known.
struct Slot {
  bool ready = false, text = false;
  int chunks = 0;  // the connection's pending chunks it holds
  std::string bytes;
  std::unique_ptr<PyRef> request;  // a text message's (its answer is encoded from it)
};

template <class Next>
class Session : public std::enable_shared_from_this<Session<Next>> {
 public:
  Session(Next &&next, WsPlan &&plan) : ws_(std::move(next)), plan_(std::move(plan)), info_(stream_lane_info(plan_.lane)) {
    if (plan_.sid.empty()) plan_.sid = new_sid();
  }

  void open(WsRequest &&upgrade) {
    ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
    ws_.set_option(websocket::stream_base::decorator(
        [sid = plan_.sid](websocket::response_type &res) { res.set("x-sequence-id", sid); }));
    ws_.read_message_max(0);  // (a message past the limit is refused here, and the session goes on)
    ws_.auto_fragment(false);
    auto request = std::make_shared<WsRequest>(std::move(upgrade));
    ws_.async_accept(*request, [self = this->shared_from_this(), request](beast::error_code ec) {
      if (ec) return;
      self->read();
    });
  }

 private:
  // --- reading: one request per message ---

  void read() {
    if (closed_ || pending_ >= info_.max_pending) {
      reading_ = false;  // (an answer reads on)
      return;
    }
    reading_ = true;
    ws_.async_read_some(in_, 1 << 16, [self = this->shared_from_this()](beast::error_code ec, size_t) {
      self->on_read(ec);
    });
  }

  void on_read(beast::error_code ec) {
    if (ec) return close();
    if (in_.size() > plan_.max_message) {  // what comes of it is dropped as it arrives
      too_big_ = true;
      in_.clear();
    }
    if (!ws_.is_message_done()) return read();
    const char *data = static_cast<const char *>(in_.data().data());
    const size_t size = in_.size();
    if (too_big_)
      refuse("message exceeds the limit of " + std::to_string(plan_.max_message) + " bytes");
    else if (ws_.got_binary())
      binary(data, size);
    else
      text(data, size);
    too_big_ = false;
    in_.clear();
    read();
  }

  void binary(const char *data, size_t size) {
    const size_t row = static_cast<size_t>(info_.chunk) * sizeof(float);
    if (size == 0 || size % row)
      return refuse("a binary message holds whole rows of input '" + info_.input + "': " + std::to_string(row) +
                    " bytes each (FP32 [" + std::to_string(info_.chunk) + "]), got " + std::to_string(size) +
                    " bytes");
    StreamAsk ask;
    ask.chunks = static_cast<int>(size / row);
    ask.samples.resize(size / sizeof(float));
    memcpy(ask.samples.data(), data, size);  // (little-endian, as the host)
    for (float v : ask.samples)
      if (!std::isfinite(v)) return refuse("input '" + info_.input + "' contains NaN or infinity");
    ask.wanted.push_back(plan_.output);
    admit(std::move(ask), nullptr);
  }

  // The lane's Python step reads it: (samples, chunks, id, wanted, snapshot, request), or the error's text.
  void text(const char *data, size_t size) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *got = PyObject_CallMethod(info_.step, "read_text", "(y#s#O)", data, static_cast<Py_ssize_t>(size),
                                        plan_.sid.data(), static_cast<Py_ssize_t>(plan_.sid.size()),
                                        started_ ? Py_False : Py_True);
    StreamAsk ask;
    std::string error;
    std::unique_ptr<PyRef> request;
    const char *samples = nullptr, *id = nullptr;
    Py_ssize_t bytes = 0, id_size = 0;
    int chunks = 0, snapshot = 0;
    PyObject *wanted = nullptr, *req = nullptr;
    if (!got) {
      PyErr_Print();
      error = "internal error (reading a text message)";
    } else if (PyUnicode_Check(got)) {
      Py_ssize_t n;
      const char *text = PyUnicode_AsUTF8AndSize(got, &n);
      error = text ? std::string(text, n) : "internal error";
    } else if (PyArg_ParseTuple(got, "y#is#OpO", &samples, &bytes, &chunks, &id, &id_size, &wanted, &snapshot, &req) &&
               PyList_Check(wanted)) {
      ask.chunks = chunks;
      ask.samples.resize(bytes / sizeof(float));
      memcpy(ask.samples.data(), samples, ask.samples.size() * sizeof(float));
      ask.id.assign(id, id_size);
      ask.snapshot = snapshot;
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(wanted); i++) {
        const char *name = PyUnicode_AsUTF8(PyList_GET_ITEM(wanted, i));
        if (name) ask.wanted.emplace_back(name);
      }
      Py_INCREF(req);
      request = std::make_unique<PyRef>(req);
    } else {
      PyErr_Print();
      error = "internal error (reading a text message)";
    }
    Py_XDECREF(got);
    PyGILState_Release(gil);
    if (!error.empty()) return refuse(error);
    admit(std::move(ask), std::move(request));
  }

  void admit(StreamAsk &&ask, std::unique_ptr<PyRef> request) {
    auto slot = std::make_shared<Slot>();
    slot->request = std::move(request);
    slot->chunks = ask.chunks;
    ask.sid = plan_.sid;
    ask.start = !started_;
    // (the reply holds the session: while the connection waits for answers and reads nothing, nothing else
    // does; the front stops its io before the lanes drop their messages, and deletes it after)
    auto self = this->shared_from_this();
    StreamReply reply = [self, slot](StreamResult &&result) {  // on a lane's worker
      asio::post(self->ws_.get_executor(),
                 [self, slot, result = std::move(result)]() mutable { self->answered(*slot, result); });
    };
    int status = 400;
    std::string refused = stream_lane_admit(plan_.lane, std::move(ask), PROTOCOL, std::move(reply), status);
    if (!refused.empty()) {
      slot->request.reset();
      slot->chunks = 0;
      slot->ready = true;
      slot->text = true;
      slot->bytes = error_json(refused);
      slots_.push_back(std::move(slot));
      return flush();
    }
    started_ = true;
    pending_ += slot->chunks;
    slots_.push_back(std::move(slot));
  }

  // A message refused before the lane saw it: counted and logged as the lane's refusals, answered in order.
  void refuse(const std::string &message) {
    stream_lane_refused(plan_.lane, 400, "", PROTOCOL);
    auto slot = std::make_shared<Slot>();
    slot->ready = slot->text = true;
    slot->bytes = error_json(message);
    slots_.push_back(std::move(slot));
    flush();
  }

  // --- writing: the answers in order ---

  void answered(Slot &slot, StreamResult &result) {
    pending_ -= slot.chunks;
    if (!result.error.empty()) {
      slot.text = true;
      slot.bytes = error_json(result.error);
    } else if (slot.request) {
      encode_text(slot, result);
    } else {
      slot.bytes = result.raw.empty() ? std::string() : std::move(result.raw[0]);
    }
    slot.request.reset();
    slot.ready = true;
    flush();
    if (!reading_ && !closed_) read();
  }

  void encode_text(Slot &slot, StreamResult &result) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *names = PyList_New(static_cast<Py_ssize_t>(result.names.size()));
    PyObject *raws = PyList_New(static_cast<Py_ssize_t>(result.raw.size()));
    for (size_t i = 0; names && raws && i < result.names.size(); i++) {
      PyList_SET_ITEM(names, i, PyUnicode_FromStringAndSize(result.names[i].data(), result.names[i].size()));
      PyList_SET_ITEM(raws, i, PyBytes_FromStringAndSize(result.raw[i].data(), result.raw[i].size()));
    }
    PyObject *got = names && raws ? PyObject_CallMethod(info_.step, "answer_text", "(Os#iOO)", slot.request->obj,
                                                        plan_.sid.data(), static_cast<Py_ssize_t>(plan_.sid.size()),
                                                        result.chunks, names, raws)
                                  : nullptr;
    const char *bytes;
    Py_ssize_t size;
    int is_text;
    if (got && PyArg_ParseTuple(got, "y#p", &bytes, &size, &is_text)) {
      slot.bytes.assign(bytes, size);
      slot.text = is_text;
    } else {
      PyErr_Print();
      slot.text = true;
      slot.bytes = error_json("internal error (answering a text message)");
    }
    Py_XDECREF(got);
    Py_XDECREF(names);
    Py_XDECREF(raws);
    PyGILState_Release(gil);
  }

  void flush() {
    if (writing_ || closed_ || slots_.empty() || !slots_.front()->ready) return;
    auto slot = std::move(slots_.front());
    slots_.pop_front();
    writing_ = true;
    ws_.text(slot->text);
    ws_.async_write(asio::buffer(slot->bytes), [self = this->shared_from_this(), slot](beast::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) return self->close();
      self->flush();
    });
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    slots_.clear();
    if (started_) stream_lane_close(plan_.lane, plan_.sid);
  }

  websocket::stream<Next> ws_;
  WsPlan plan_;
  StreamLaneInfo info_;
  beast::flat_buffer in_;
  std::deque<std::shared_ptr<Slot>> slots_;
  int pending_ = 0;  // chunks admitted and not answered
  bool started_ = false, reading_ = false, writing_ = false, closed_ = false, too_big_ = false;
};

template <class Next>
void open_session(Next &&next, WsRequest &&upgrade, WsPlan &&plan) {
  beast::get_lowest_layer(next).expires_never();
  std::make_shared<Session<Next>>(std::move(next), std::move(plan))->open(std::move(upgrade));
}

}  // namespace

void ws_open(beast::tcp_stream &&stream, WsRequest &&upgrade, WsPlan &&plan) {
  open_session(std::move(stream), std::move(upgrade), std::move(plan));
}

void ws_open(beast::ssl_stream<beast::tcp_stream> &&stream, WsRequest &&upgrade, WsPlan &&plan) {
  open_session(std::move(stream), std::move(upgrade), std::move(plan));
}

// "/v2/models/{name}[/versions/{v}]/stream" and its query, as the lane would take them.
bool ws_plan(Lanes *lanes, std::string_view target, size_t max_message, WsPlan &plan) {
  const std::string_view prefix = "/v2/models/", suffix = "/stream";
  const size_t mark = target.find('?');
  std::string_view path = target.substr(0, mark), query = mark == std::string_view::npos ? "" : target.substr(mark + 1);
  if (path.size() <= prefix.size() + suffix.size() || path.substr(0, prefix.size()) != prefix ||
      path.substr(path.size() - suffix.size()) != suffix || target.find_first_of("%+#") != std::string_view::npos)
    return false;
  std::string_view rest = path.substr(prefix.size(), path.size() - prefix.size() - suffix.size());
  std::string version;
  const size_t slash = rest.find('/');
  if (slash != std::string_view::npos) {
    const std::string_view versions = "/versions/";
    if (rest.substr(slash, versions.size()) != versions) return false;
    version.assign(rest.substr(slash + versions.size()));
    rest = rest.substr(0, slash);
    if (version.empty() || version.find('/') != std::string::npos) return false;
  }
  plan.model.assign(rest);
  if (plan.model.empty()) return false;
  Lane *lane = lanes_stream_lane(lanes, plan.model);
  if (!lane) return false;
  const StreamLaneInfo info = stream_lane_info(lane);
  if (!info.websocket || (!version.empty() && version != info.version)) return false;
  std::string input, output;
  bool seen[3] = {false, false, false};
  const char *keys[3] = {"sequence_id", "input", "output"};
  std::string *values[3] = {&plan.sid, &input, &output};
  while (!query.empty()) {
    const size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? "" : query.substr(amp + 1);
    const size_t eq = pair.find('=');
    std::string_view key = pair.substr(0, eq), value = eq == std::string_view::npos ? "" : pair.substr(eq + 1);
    for (int k = 0; k < 3; k++) {
      if (key != keys[k]) continue;
      if (seen[k]) return false;  // (repeated: Python's reading rules)
      seen[k] = true;
      values[k]->assign(value);
    }
  }
  if (seen[1] && input != info.input) return false;
  output = seen[2] ? output : info.outputs.front();
  bool known = false;
  for (const auto &name : info.outputs) known = known || name == output;
  if (!known) return false;
  for (unsigned char ch : plan.sid)  // (the engine's messages quote it as Python's repr would)
    if (ch < 0x20 || ch >= 0x7f || ch == '\'' || ch == '\\') return false;
  plan.lane = lane;
  plan.output = output;
  plan.max_message = max_message;
  return true;
}

}  // namespace cellserve_front
