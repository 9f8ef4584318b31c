// Stream lanes: the session messages of a streaming model (ModelInfer and ModelStreamInfer with a
// sequence_id), parsed, checked, held per session, batched and answered here, without Python per message.
// Native WebSocket sessions (websocket_front.cpp) admit theirs into the same sessions and steps through
// stream_lanes.h, and get their outputs back to encode for their wire.
//
// Python registers a lane per model it can hand over (server/native/grpc_front.py): the one input a client
// sends (FP32 [chunks, samples]), the samples of context a session keeps, the width of its flat state, the
// outputs, the session limits, and `step`, the model's computation on a batch of messages
// (engine/lane.py). A lane's worker threads (one per core: ONNX Runtime and our kernels let go of the GIL, so
// steps overlap) each take every message whose session is idle (one per session, in arrival order), up to the
// model's rows per step, and call `step` once for all of them: Python runs once per engine step, never per
// message (BatchMaker: one cell invocation per step, whatever the request count).
//
// What a lane does not take goes to Python as before: other models, malformed or ill-shaped requests (Python
// words the error), sessions it does not hold (unknown, expired, restored from a snapshot, or opened by an
// HTTP POST), and restores. A session lives where it was opened; its later messages follow it.
//
// Locks: a call's lock is held while it offers a message (OnReadDone), so the lane never takes a call's or
// the registry's lock under its own; the worker answers (and releases held streams) after letting it go.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>
#include <unordered_set>

#include <pthread.h>

#include "front.h"
#include "lanes.h"
#include "stream_lanes.h"
#include "token_lanes.h"

namespace cellserve_front {

namespace {

struct Job {
  uint64_t call;
  bool stream, start, end, snapshot;
  std::string id, sid, logged_id;  // logged_id: the access log's name for it (id, or the call's x-request-id)
  int chunks;
  std::vector<float> samples;       // chunks x the lane's samples per chunk
  std::vector<std::string> wanted;  // the outputs asked for, in order (none: all)
  double arrival;
  const char *protocol = "grpc";    // the access log's name of its wire
  StreamReply reply;                // another wire's (a WebSocket's): called with the answer; else gRPC's call
};

// A message the lane (or its wire) refused, for Python's statistics, metrics and access log.
struct Refusal {
  int status;
  std::string id;
  const char *protocol;
};

// What Lane::admit did with a message.
struct Admission {
  enum What { TAKEN, PYTHON, REFUSED } what = PYTHON;
  bool hold = false;  // TAKEN from a gRPC stream whose session is past its pending chunks
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string text;
};

struct Session {
  std::vector<float> state, context;
  bool busy = false, ending = false;  // ending: its last message has arrived
  bool closed = false;                // its WebSocket closed: it ends when its message in a step is answered
  std::deque<Job> waiting;            // its messages behind the one in a step
  int pending = 0;                    // its chunks not answered yet
  std::vector<uint64_t> holding;      // streams held for it (pending past the limit)
  double last_active = 0;
};

struct Output {
  std::string name;
  std::vector<int64_t> rest;  // a chunk's shape after its batch axis
  size_t size;                // a chunk's elements
};

// A request a lane refused: the stream's error message, or the unary call's status.
Offer refused(const inference::ModelInferRequest &request, bool stream, grpc::StatusCode code, const std::string &text) {
  Offer offer;
  if (stream) {
    inference::ModelStreamInferResponse answer;
    answer.set_error_message(text);
    auto *failed = answer.mutable_infer_response();
    failed->set_model_name(request.model_name());
    failed->set_model_version(request.model_version());
    failed->set_id(request.id());
    offer.what = Offer::ANSWERED;
    answer.SerializeToString(&offer.answer);
  } else {
    offer.what = Offer::FAILED;
    offer.code = code;
    offer.message = text;
  }
  return offer;
}

// Python's repr of a str without quotes or backslashes in it ('x'): the engine's messages name sequences so.
std::string quoted(const std::string &sid) { return "'" + sid + "'"; }

}  // namespace

struct Lane {
  Front *front;
  std::string model, version, input;
  int chunk, context, width, max_rows, max_sessions, max_pending;
  double idle_timeout;
  bool websocket = false;  // its sessions may open as native WebSockets (websocket_front.cpp)
  std::vector<Output> outputs;
  // step(x, counts, state, queued, n, most, row, snapshot_rows, ids, protocols) -> (outputs, state, snapshots)
  PyObject *step;

  std::mutex mu;
  std::condition_variable cv;
  std::unordered_map<std::string, Session> sessions;
  std::unordered_set<std::string> python_owned;  // sessions opened through Python (restores): theirs
  std::deque<Job> ready;
  std::vector<Refusal> refusals;  // requests refused since the last step, for the statistics
  std::vector<std::string> closed_sids;  // sessions whose WebSocket closed, for Python to remember why
  bool stopping = false, draining = false;
  std::vector<std::thread> workers;  // each takes its own steps; a session is in one step at a time
  // Worker 0 takes whatever is ready; the others (helpers, on their own condition) only once this many
  // messages are ready, so at light load every step runs on the one warm thread, and two half-full steps
  // never cost twice the per-step work (Python, ONNX Runtime's calls, wake-ups) for the same rows. Silero VAD,
  // 16 unary clients, alternating runs: one worker 9529 / 8254 req/s against two taking alike 6834 / 7177
  // (133-153 against 155-162 us of server CPU per request); a loaded stream server still gets all of them.
  std::condition_variable helpers_cv;
  int join_rows = 1;
  bool helpers_wanted() const { return static_cast<int>(ready.size()) >= join_rows; }
  void wake() {
    cv.notify_one();
    if (helpers_wanted()) helpers_cv.notify_one();
  }

  Offer offer(const inference::ModelInferRequest &request, uint64_t call, bool stream, const std::string &logged_id);
  Admission admit(Job &&job, bool restore);
  // a refusal, counted (worker 0 tells Python, with its next step or alone); under mu
  Admission refuse(const Job &job, grpc::StatusCode code, std::string text) {
    refusals.push_back({code == grpc::StatusCode::UNAVAILABLE ? 503 : 400, job.logged_id, job.protocol});
    cv.notify_one();
    return Admission{Admission::REFUSED, false, code, std::move(text)};
  }
  void run(int index);
  StreamResult result_of(const Job &job, int i, const std::vector<std::vector<float>> &outs,
                         const std::vector<std::string> &snapshots, const std::string &error, int most) const;
  void finish(std::vector<Job> &jobs, std::vector<float> &state, std::vector<std::vector<float>> &outs,
              std::vector<std::string> &snapshots, const std::string &error, std::vector<float> &x, int width_x,
              int most);
};

// token_lanes.cpp's face
Offer token_lane_offer(TokenLane *lane, const inference::ModelInferRequest &request, uint64_t call, bool stream,
                       const std::string &logged_id);
TokenLane *token_lane_new(Front *front, PyObject *args);
const std::string &token_lane_model(const TokenLane *lane);
void token_lane_drain(TokenLane *lane);
void token_lane_flush(TokenLane *lane);
void token_lane_stop(TokenLane *lane);
void token_lane_delete(TokenLane *lane);

struct Lanes {
  Front *front;
  std::mutex mu;  // the maps; lanes are added before serving and live until the front is deleted
  std::unordered_map<std::string, std::unique_ptr<Lane>> by_model;
  std::unordered_map<std::string, TokenLane *> tokens;  // a model's stateless requests (token_lanes.cpp)
};

Lanes *lanes_new(Front *front) { return new Lanes{front, {}, {}, {}}; }

TokenLane *lanes_token_lane(Lanes *lanes, const std::string &model) {
  std::lock_guard<std::mutex> lock(lanes->mu);
  auto it = lanes->tokens.find(model);
  return it == lanes->tokens.end() ? nullptr : it->second;
}

// --- taking a message --------------------------------------------------------------------------------------

Offer lanes_offer(Lanes *lanes, uint64_t call, bool stream, const std::string &payload, const std::string &logged_id) {
  inference::ModelInferRequest request;
  if (!request.ParseFromString(payload)) return Offer{};  // Python words the error
  Lane *lane = nullptr;
  TokenLane *tokens = nullptr;
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    auto it = lanes->by_model.find(request.model_name());
    if (it != lanes->by_model.end()) {
      lane = it->second.get();
    } else {
      auto t = lanes->tokens.find(request.model_name());
      if (t == lanes->tokens.end()) return Offer{};
      tokens = t->second;
    }
  }
  return lane ? lane->offer(request, call, stream, logged_id)
              : token_lane_offer(tokens, request, call, stream, logged_id);
}

Offer Lane::offer(const inference::ModelInferRequest &request, uint64_t call, bool stream,
                  const std::string &logged_id) {
  if (!request.model_version().empty() && request.model_version() != version) return Offer{};
  // the sequence parameters: exactly as the Python path reads them, else Python answers
  const auto &params = request.parameters();
  auto sid_param = params.find("sequence_id");
  if (sid_param == params.end()) return Offer{};
  std::string sid;
  if (sid_param->second.parameter_choice_case() == inference::InferParameter::kInt64Param &&
      sid_param->second.int64_param() != 0)
    sid = std::to_string(sid_param->second.int64_param());
  else if (sid_param->second.parameter_choice_case() == inference::InferParameter::kStringParam &&
           !sid_param->second.string_param().empty())
    sid = sid_param->second.string_param();
  else
    return Offer{};
  if (sid.find_first_of("'\\") != std::string::npos) return Offer{};  // (the engine's messages quote it)
  bool flags[4] = {false, false, false, false};
  const char *names[4] = {"sequence_start", "sequence_end", "sequence_snapshot", "sequence_restore"};
  for (int i = 0; i < 4; i++) {
    auto it = params.find(names[i]);
    if (it == params.end()) continue;
    if (it->second.parameter_choice_case() != inference::InferParameter::kBoolParam) return Offer{};
    flags[i] = it->second.bool_param();
  }
  const bool start = flags[0], end = flags[1], snapshot = flags[2], restore = flags[3];
  if (start && restore) return Offer{};
  // the one input, FP32 [chunks, samples], finite
  if (request.inputs_size() != 1) return Offer{};
  const auto &tensor = request.inputs(0);
  if (tensor.name() != input || tensor.datatype() != "FP32" || tensor.shape_size() != 2 || tensor.shape(0) < 1 ||
      tensor.shape(0) > 1 << 20 || tensor.shape(1) != chunk)
    return Offer{};
  const int chunks = static_cast<int>(tensor.shape(0));
  const size_t count = static_cast<size_t>(chunks) * chunk;
  Job job{call, stream, start, end, snapshot, request.id(), sid, logged_id.empty() ? request.id() : logged_id,
          chunks, {}, {}, now_s()};
  job.samples.resize(count);
  if (request.raw_input_contents_size() == 1) {
    const std::string &raw = request.raw_input_contents(0);
    if (raw.size() != count * sizeof(float)) return Offer{};
    memcpy(job.samples.data(), raw.data(), raw.size());
  } else if (request.raw_input_contents_size() == 0 &&
             static_cast<size_t>(tensor.contents().fp32_contents_size()) == count) {
    std::copy(tensor.contents().fp32_contents().begin(), tensor.contents().fp32_contents().end(), job.samples.begin());
  } else {
    return Offer{};
  }
  for (float v : job.samples)
    if (!std::isfinite(v)) return Offer{};
  for (const auto &asked : request.outputs()) {
    bool known = snapshot && asked.name() == "sequence_snapshot";
    for (const auto &o : outputs) known = known || o.name == asked.name();
    if (!known) return Offer{};
    job.wanted.push_back(asked.name());
  }
  Admission admitted = admit(std::move(job), restore);
  Offer offer;
  if (admitted.what == Admission::TAKEN) {
    offer.what = Offer::TAKEN;
    offer.hold = admitted.hold;
  } else if (admitted.what == Admission::REFUSED) {
    offer = refused(request, stream, admitted.code, admitted.text);
  }
  return offer;
}

// The session decides: where it lives answers it (Python's sessions, restores and unknown ones: PYTHON).
Admission Lane::admit(Job &&job, bool restore) {
  const std::string sid = job.sid;
  const bool start = job.start, end = job.end;
  Admission taken{Admission::TAKEN};
  std::lock_guard<std::mutex> lock(mu);
  if (stopping) return Admission{};
  if (restore) {  // the engine opens it from the snapshot (a session of that name here is replaced)
    auto here = sessions.find(sid);
    if (here != sessions.end() && !here->second.busy) sessions.erase(here);
    if (!end) python_owned.insert(sid);
    return Admission{};
  }
  if (python_owned.count(sid)) {
    if (end) python_owned.erase(sid);  // (its next opening may be ours)
    return Admission{};
  }
  auto it = sessions.find(sid);
  if (start) {
    if (draining)
      return refuse(job, grpc::StatusCode::UNAVAILABLE,
                    "the server is shutting down: it finishes open sessions but takes no new work; retry on "
                    "another replica");
    if (it != sessions.end()) {
      if (it->second.busy)
        return refuse(job, grpc::StatusCode::INVALID_ARGUMENT,
                      "sequence " + quoted(sid) + " has chunks in flight; end it before restarting");
      it->second = Session{};
    } else {
      if (static_cast<int>(sessions.size()) >= max_sessions)
        return refuse(job, grpc::StatusCode::UNAVAILABLE,
                      "this model holds its maximum of " + std::to_string(max_sessions) +
                          " open sequences; end one (sequence_end) or retry later");
      it = sessions.emplace(sid, Session{}).first;
    }
    it->second.state.assign(width, 0.0f);
    it->second.context.assign(context, 0.0f);
  } else if (it == sessions.end() || it->second.ending || it->second.closed) {
    return Admission{};  // unknown or ended here: the engine knows it, or says why not
  }
  Session &session = it->second;
  session.last_active = job.arrival;
  session.ending = end;
  session.pending += job.chunks;
  if (job.stream && session.pending > max_pending &&
      std::find(session.holding.begin(), session.holding.end(), job.call) == session.holding.end()) {
    session.holding.push_back(job.call);
    taken.hold = true;
  }
  if (session.busy) {
    session.waiting.push_back(std::move(job));
  } else {
    session.busy = true;
    ready.push_back(std::move(job));
    wake();
  }
  return taken;
}

// --- the other wires' face (stream_lanes.h) ------------------------------------------------------------------

Lane *lanes_stream_lane(Lanes *lanes, const std::string &model) {
  std::lock_guard<std::mutex> lock(lanes->mu);
  auto it = lanes->by_model.find(model);
  return it == lanes->by_model.end() ? nullptr : it->second.get();
}

StreamLaneInfo stream_lane_info(const Lane *lane) {
  StreamLaneInfo info;
  info.version = lane->version;
  info.input = lane->input;
  info.chunk = lane->chunk;
  info.max_pending = lane->max_pending;
  for (const auto &out : lane->outputs) info.outputs.push_back(out.name);
  info.step = lane->step;
  info.websocket = lane->websocket;
  return info;
}

std::string stream_lane_admit(Lane *lane, StreamAsk &&ask, const char *protocol, StreamReply reply, int &status) {
  Job job{0, false, ask.start, false, ask.snapshot, ask.id, ask.sid, ask.id, ask.chunks, std::move(ask.samples),
          std::move(ask.wanted), now_s(), protocol, std::move(reply)};
  const std::string sid = job.sid;
  Admission admitted = lane->admit(std::move(job), false);
  if (admitted.what == Admission::TAKEN) return "";
  if (admitted.what == Admission::REFUSED) {
    status = admitted.code == grpc::StatusCode::UNAVAILABLE ? 503 : 400;
    return admitted.text;
  }
  // a session this wire opened and the lane no longer holds: expired (or opened elsewhere since)
  status = 400;
  char idle[32];
  snprintf(idle, sizeof idle, "%g", lane->idle_timeout);
  stream_lane_refused(lane, status, ask.id, protocol);
  return "sequence " + quoted(sid) + " expired after " + idle + " s idle; start a new one with sequence_start";
}

void stream_lane_refused(Lane *lane, int status, const std::string &id, const char *protocol) {
  std::lock_guard<std::mutex> lock(lane->mu);
  lane->refusals.push_back({status, id, protocol});
  lane->cv.notify_one();
}

void stream_lane_close(Lane *lane, const std::string &sid) {
  std::lock_guard<std::mutex> lock(lane->mu);
  auto it = lane->sessions.find(sid);
  if (it == lane->sessions.end() || it->second.closed) return;
  if (it->second.busy)
    it->second.closed = true;  // (finish ends it after its last message)
  else
    lane->sessions.erase(it);
  lane->closed_sids.push_back(sid);
  lane->cv.notify_one();
}

// --- the worker: one step per batch of ready messages --------------------------------------------------------

namespace {

// A Python buffer of `count` float32 (or int32) values, C-contiguous; false with a Python error otherwise.
bool exact_buffer(PyObject *obj, size_t count, size_t item, Py_buffer *view) {
  if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return false;
  if (static_cast<size_t>(view->len) != count * item || view->itemsize != static_cast<Py_ssize_t>(item)) {
    PyBuffer_Release(view);
    PyErr_Format(PyExc_ValueError, "a lane step returned %zd bytes where %zu were expected", view->len, count * item);
    return false;
  }
  return true;
}

// A failed step's error for its requests: "internal error (ExceptionType)"; the traceback goes to stderr (the
// step logs its own failures; this catches what fails around it).
std::string python_error() {
  PyObject *type, *value, *trace;
  PyErr_Fetch(&type, &value, &trace);
  PyErr_NormalizeException(&type, &value, &trace);
  if (type && !PyErr_GivenExceptionMatches(type, PyExc_Exception)) PyErr_Clear();
  if (type) {
    Py_INCREF(type);
    Py_XINCREF(value);
    Py_XINCREF(trace);
    PyErr_Restore(type, value, trace);
    PyErr_Print();
  }
  std::string text = "internal error";
  if (type) {
    const char *name = reinterpret_cast<PyTypeObject *>(type)->tp_name;
    const char *dot = strrchr(name, '.');
    text += std::string(" (") + (dot ? dot + 1 : name) + ")";
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(trace);
  return text;
}

}  // namespace

void Lane::run(int index) {
  const double sweep = std::max(0.01, std::min(1.0, idle_timeout / 4));
  double next_sweep = now_s() + sweep;
  std::vector<Job> jobs;
  std::vector<float> x, state;
  std::vector<int32_t> counts;
  std::vector<double> queued;
  std::vector<Refusal> refused_now;
  std::vector<std::string> closed_now;
  for (;;) {
    int most = 0;  // the most chunks of a message in this step
    {
      std::unique_lock<std::mutex> lock(mu);
      if (index == 0)
        cv.wait_for(lock, std::chrono::duration<double>(sweep),
                    [&] { return stopping || !ready.empty() || !refusals.empty() || !closed_sids.empty(); });
      else
        helpers_cv.wait_for(lock, std::chrono::duration<double>(sweep), [&] { return stopping || helpers_wanted(); });
      if (ready.empty() && stopping) return;
      double now = now_s();
      if (now >= next_sweep) {  // idle sessions expire
        next_sweep = now + sweep;
        for (auto it = sessions.begin(); it != sessions.end();)
          it = !it->second.busy && now - it->second.last_active > idle_timeout ? sessions.erase(it) : std::next(it);
      }
      jobs.clear();
      while (!ready.empty() && static_cast<int>(jobs.size()) < max_rows) {
        jobs.push_back(std::move(ready.front()));
        ready.pop_front();
      }
      if (index == 0) {
        refused_now.swap(refusals);
        refusals.clear();
        closed_now.swap(closed_sids);
        closed_sids.clear();
      }
      if (jobs.empty() && refused_now.empty() && closed_now.empty()) continue;
      for (auto &job : jobs) most = std::max(most, job.chunks);
      const int n = static_cast<int>(jobs.size()), row = context + chunk;
      x.assign(static_cast<size_t>(n) * most * row, 0.0f);
      state.resize(static_cast<size_t>(n) * width);
      counts.resize(n);
      queued.resize(n);
      for (int i = 0; i < n; i++) {  // each chunk after its context: the previous chunk's last samples
        Session &session = sessions[jobs[i].sid];
        memcpy(&state[static_cast<size_t>(i) * width], session.state.data(), width * sizeof(float));
        const float *before = session.context.data();
        for (int k = 0; k < jobs[i].chunks; k++) {
          float *dst = &x[(static_cast<size_t>(i) * most + k) * row];
          memcpy(dst, before, context * sizeof(float));
          memcpy(dst + context, &jobs[i].samples[static_cast<size_t>(k) * chunk], chunk * sizeof(float));
          before = dst + row - context;
        }
        counts[i] = jobs[i].chunks;
        queued[i] = now - jobs[i].arrival;
      }
    }
    // the step: Python once for every message taken
    const int n = static_cast<int>(jobs.size());
    std::vector<std::vector<float>> outs(outputs.size());
    std::vector<std::string> snapshots(n);
    std::string error;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!refused_now.empty()) {  // step.refused(statuses, ids, protocols): their statistics, in one call
      const Py_ssize_t count = static_cast<Py_ssize_t>(refused_now.size());
      PyObject *statuses = PyList_New(count), *ids = PyList_New(count), *protocols = PyList_New(count);
      for (Py_ssize_t i = 0; statuses && ids && protocols && i < count; i++) {
        const Refusal &r = refused_now[i];
        PyList_SET_ITEM(statuses, i, PyLong_FromLong(r.status));
        PyList_SET_ITEM(ids, i, PyUnicode_DecodeUTF8(r.id.data(), static_cast<Py_ssize_t>(r.id.size()), "replace"));
        PyList_SET_ITEM(protocols, i, PyUnicode_FromString(r.protocol));
      }
      PyObject *done = statuses && ids && protocols
                           ? PyObject_CallMethod(step, "refused", "(OOO)", statuses, ids, protocols) : nullptr;
      if (!done) python_error();
      Py_XDECREF(done);
      Py_XDECREF(statuses);
      Py_XDECREF(ids);
      Py_XDECREF(protocols);
      refused_now.clear();
    }
    if (!closed_now.empty()) {  // step.closed(sids): Python remembers why they ended
      PyObject *sids = PyList_New(static_cast<Py_ssize_t>(closed_now.size()));
      for (size_t i = 0; sids && i < closed_now.size(); i++)
        PyList_SET_ITEM(sids, i, PyUnicode_DecodeUTF8(closed_now[i].data(),
                                                      static_cast<Py_ssize_t>(closed_now[i].size()), "replace"));
      PyObject *done = sids ? PyObject_CallMethod(step, "closed", "(O)", sids) : nullptr;
      if (!done) python_error();
      Py_XDECREF(done);
      Py_XDECREF(sids);
      closed_now.clear();
    }
    if (n == 0) {
      PyGILState_Release(gil);
      continue;
    }
    {
      const Py_ssize_t row = context + chunk;
      PyObject *snap_rows = PyList_New(0), *ids = PyList_New(n), *protocols = PyList_New(n);
      for (int i = 0; snap_rows && ids && protocols && i < n; i++) {
        const std::string &logged = jobs[i].logged_id;
        PyObject *id = PyUnicode_DecodeUTF8(logged.data(), static_cast<Py_ssize_t>(logged.size()), "replace");
        if (!id) Py_CLEAR(ids);
        if (ids) PyList_SET_ITEM(ids, i, id);
        PyObject *protocol = PyUnicode_FromString(jobs[i].protocol);
        if (!protocol) Py_CLEAR(protocols);
        if (protocols) PyList_SET_ITEM(protocols, i, protocol);
        if (!jobs[i].snapshot) continue;
        PyObject *index = PyLong_FromLong(i);
        if (!index || PyList_Append(snap_rows, index) < 0) Py_CLEAR(snap_rows);
        Py_XDECREF(index);
      }
      // the arrays go in as read-only views of this thread's buffers, not copies; the step keeps none of them
      // past its return (each view is released after the call)
      PyObject *views[4] = {
          PyMemoryView_FromMemory(reinterpret_cast<char *>(x.data()), x.size() * sizeof(float), PyBUF_READ),
          PyMemoryView_FromMemory(reinterpret_cast<char *>(counts.data()), counts.size() * sizeof(int32_t), PyBUF_READ),
          PyMemoryView_FromMemory(reinterpret_cast<char *>(state.data()), state.size() * sizeof(float), PyBUF_READ),
          PyMemoryView_FromMemory(reinterpret_cast<char *>(queued.data()), queued.size() * sizeof(double), PyBUF_READ)};
      const bool viewed = views[0] && views[1] && views[2] && views[3];
      PyObject *result = snap_rows && ids && protocols && viewed
          ? PyObject_CallFunction(step, "(OOOOiiiOOO)", views[0], views[1], views[2], views[3], n, most,
                                  static_cast<int>(row), snap_rows, ids, protocols)
          : nullptr;
      PyObject *type, *value, *trace;
      PyErr_Fetch(&type, &value, &trace);  // (a failed step's traceback may still hold its arrays)
      for (PyObject *view : views) {
        if (!view) continue;
        PyObject *released = PyObject_CallMethod(view, "release", nullptr);
        if (!released && !type) PyErr_WriteUnraisable(view);  // an array still exports it: a step that kept one
        PyErr_Clear();
        Py_XDECREF(released);
        Py_DECREF(view);
      }
      PyErr_Restore(type, value, trace);
      Py_XDECREF(snap_rows);
      Py_XDECREF(ids);
      Py_XDECREF(protocols);
      bool ok = result && PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 3 &&
                PyList_Check(PyTuple_GET_ITEM(result, 0)) &&
                PyList_GET_SIZE(PyTuple_GET_ITEM(result, 0)) == static_cast<Py_ssize_t>(outputs.size()) &&
                PyList_Check(PyTuple_GET_ITEM(result, 2)) && PyList_GET_SIZE(PyTuple_GET_ITEM(result, 2)) == n;
      if (result && !ok) PyErr_SetString(PyExc_TypeError, "a lane step returns ([outputs], state, [snapshots])");
      for (size_t o = 0; ok && o < outputs.size(); o++) {
        Py_buffer view;
        ok = exact_buffer(PyList_GET_ITEM(PyTuple_GET_ITEM(result, 0), o),
                          static_cast<size_t>(n) * most * outputs[o].size, sizeof(float), &view);
        if (ok) {
          const float *values = static_cast<const float *>(view.buf);
          outs[o].assign(values, values + view.len / sizeof(float));
          PyBuffer_Release(&view);
        }
      }
      if (ok) {
        Py_buffer view;
        ok = exact_buffer(PyTuple_GET_ITEM(result, 1), state.size(), sizeof(float), &view);
        if (ok) {
          memcpy(state.data(), view.buf, view.len);
          PyBuffer_Release(&view);
        }
      }
      for (int i = 0; ok && i < n; i++) {
        PyObject *blob = PyList_GET_ITEM(PyTuple_GET_ITEM(result, 2), i);
        if (blob == Py_None) continue;
        char *data;
        Py_ssize_t size;
        ok = PyBytes_AsStringAndSize(blob, &data, &size) == 0;
        if (ok) snapshots[i].assign(data, size);
      }
      if (!ok) error = python_error();
      Py_XDECREF(result);
    }
    PyGILState_Release(gil);
    finish(jobs, state, outs, snapshots, error, x, context + chunk, most);
  }
}

// Sessions take the step's state and context and their next messages; then every message is answered and
// the streams that waited for a session read on.
void Lane::finish(std::vector<Job> &jobs, std::vector<float> &state, std::vector<std::vector<float>> &outs,
                  std::vector<std::string> &snapshots, const std::string &error, std::vector<float> &x, int row,
                  int most) {
  const int n = static_cast<int>(jobs.size());
  std::vector<uint64_t> released;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < n; i++) {
      Job &job = jobs[i];
      auto it = sessions.find(job.sid);
      if (it == sessions.end()) continue;
      Session &session = it->second;
      if (error.empty()) {
        memcpy(session.state.data(), &state[static_cast<size_t>(i) * width], width * sizeof(float));
        const float *last = &x[(static_cast<size_t>(i) * most + job.chunks - 1) * row];
        memcpy(session.context.data(), last + row - context, context * sizeof(float));
      }
      session.pending -= job.chunks;
      session.last_active = now_s();
      if (session.pending <= max_pending) {
        released.insert(released.end(), session.holding.begin(), session.holding.end());
        session.holding.clear();
      }
      if (!session.waiting.empty()) {
        ready.push_back(std::move(session.waiting.front()));
        session.waiting.pop_front();
      } else if (job.end || session.closed) {
        released.insert(released.end(), session.holding.begin(), session.holding.end());
        sessions.erase(it);
      } else {
        session.busy = false;
      }
    }
    if (!ready.empty()) wake();  // (this worker may be a helper, which would not take them alone)
  }
  std::string bytes;
  for (int i = 0; i < n; i++) {
    const Job &job = jobs[i];
    if (job.reply) {
      job.reply(result_of(job, i, outs, snapshots, error, most));
      continue;
    }
    if (!error.empty()) {
      if (job.stream) {
        inference::ModelStreamInferResponse answer;
        answer.set_error_message(error);
        answer.mutable_infer_response()->set_model_name(model);
        answer.mutable_infer_response()->set_id(job.id);
        answer.SerializeToString(&bytes);
        front->post(job.call, std::move(bytes), false);
      } else {
        front->with_call(job.call, [&](Call *c) { c->fail(grpc::StatusCode::INTERNAL, error); });
      }
      continue;
    }
    LaneAnswer envelope(job.stream, model, version, job.id);
    inference::ModelInferResponse &answer = envelope.response();
    auto &parameters = *answer.mutable_parameters();
    if (job.chunks == 1) parameters["frames_pending"].set_int64_param(0);  // (blocks of one frame hold none back)
    parameters["sequence_id"].set_string_param(job.sid);
    auto add = [&](size_t o) {
      const Output &out = outputs[o];
      auto *tensor = answer.add_outputs();
      tensor->set_name(out.name);
      tensor->set_datatype("FP32");
      tensor->add_shape(job.chunks);
      for (int64_t d : out.rest) tensor->add_shape(d);
      const float *values = &outs[o][static_cast<size_t>(i) * most * out.size];
      answer.add_raw_output_contents(reinterpret_cast<const char *>(values), job.chunks * out.size * sizeof(float));
    };
    auto add_snapshot = [&] {
      auto *tensor = answer.add_outputs();
      tensor->set_name("sequence_snapshot");
      tensor->set_datatype("BYTES");
      tensor->add_shape(1);
      uint32_t size = static_cast<uint32_t>(snapshots[i].size());  // BYTES: each element after its length
      std::string raw(reinterpret_cast<const char *>(&size), sizeof(size));
      answer.add_raw_output_contents(raw + snapshots[i]);
    };
    if (job.wanted.empty()) {
      for (size_t o = 0; o < outputs.size(); o++) add(o);
      if (job.snapshot) add_snapshot();
    } else {
      for (const auto &name : job.wanted) {
        if (name == "sequence_snapshot") {
          add_snapshot();
          continue;
        }
        for (size_t o = 0; o < outputs.size(); o++)
          if (outputs[o].name == name) add(o);
      }
    }
    front->post(job.call, envelope.bytes(), !job.stream);
  }
  for (uint64_t call : released) front->with_call(call, [](Call *c) { c->release_hold(); });
}

// A message's answer for another wire: its outputs' bytes in the order asked for.
StreamResult Lane::result_of(const Job &job, int i, const std::vector<std::vector<float>> &outs,
                             const std::vector<std::string> &snapshots, const std::string &error, int most) const {
  StreamResult result;
  result.chunks = job.chunks;
  if (!error.empty()) {
    result.error = error;
    return result;
  }
  auto add = [&](size_t o) {
    const float *values = &outs[o][static_cast<size_t>(i) * most * outputs[o].size];
    result.names.push_back(outputs[o].name);
    result.raw.emplace_back(reinterpret_cast<const char *>(values), job.chunks * outputs[o].size * sizeof(float));
  };
  if (job.wanted.empty())
    for (size_t o = 0; o < outputs.size(); o++) add(o);
  for (const auto &name : job.wanted) {
    for (size_t o = 0; o < outputs.size(); o++)
      if (outputs[o].name == name) add(o);
    if (name == "sequence_snapshot") {
      result.names.push_back(name);
      result.raw.push_back(snapshots[i]);
    }
  }
  if (job.wanted.empty() && job.snapshot) {
    result.names.push_back("sequence_snapshot");
    result.raw.push_back(snapshots[i]);
  }
  return result;
}

void lanes_stop(Lanes *lanes) {
  std::vector<Lane *> all;
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    for (auto &kv : lanes->by_model) all.push_back(kv.second.get());
  }
  for (Lane *lane : all) {
    {
      std::lock_guard<std::mutex> lock(lane->mu);
      lane->stopping = true;
    }
    lane->cv.notify_all();
    lane->helpers_cv.notify_all();
    for (auto &worker : lane->workers) worker.join();
  }
  std::vector<TokenLane *> tokens;
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    for (auto &kv : lanes->tokens) tokens.push_back(kv.second);
  }
  for (TokenLane *t : tokens) token_lane_stop(t);
}

void lanes_delete(Lanes *lanes) {
  for (auto &kv : lanes->by_model) Py_XDECREF(kv.second->step);
  for (auto &kv : lanes->tokens) token_lane_delete(kv.second);
  delete lanes;
}

// --- the Python face (grpc_front.cpp's Front object calls these) ------------------------------------------

// add_lane(model, version, input, chunk, context, width, max_rows, max_sessions, max_pending_chunks,
//          idle_timeout_s, outputs [(name, [dims after the batch axis])], step, workers, websocket=False)
// websocket: its sessions may open as native WebSockets (the stream route's default input and output, as
// Python reads them from the model's metadata, are the lane's input and first output)
PyObject *lanes_add(Lanes *lanes, PyObject *args) {
  const char *model, *version, *input;
  int chunk, context, width, max_rows, max_sessions, max_pending, workers, websocket = 0;
  double idle_timeout;
  PyObject *outputs, *step;
  if (!PyArg_ParseTuple(args, "sssiiiiiidOOi|p", &model, &version, &input, &chunk, &context, &width, &max_rows,
                        &max_sessions, &max_pending, &idle_timeout, &outputs, &step, &workers, &websocket))
    return nullptr;
  if (chunk < 1 || context < 0 || width < 1 || max_rows < 1 || max_sessions < 1 || max_pending < 1 ||
      !(idle_timeout > 0) || !PyCallable_Check(step) || workers < 1 || workers > 64) {
    PyErr_SetString(PyExc_ValueError, "add_lane: sizes and limits must be positive and step callable");
    return nullptr;
  }
  auto lane = std::make_unique<Lane>();
  lane->front = lanes->front;
  lane->model = model;
  lane->version = version;
  lane->input = input;
  lane->chunk = chunk;
  lane->context = context;
  lane->width = width;
  lane->max_rows = max_rows;
  lane->join_rows = std::max(1, max_rows / 4);
  lane->max_sessions = max_sessions;
  lane->max_pending = max_pending;
  lane->idle_timeout = idle_timeout;
  lane->websocket = websocket;
  PyObject *seq = PySequence_Fast(outputs, "add_lane: outputs is a list of (name, dims)");
  if (!seq) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
    const char *name;
    PyObject *dims;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "sO", &name, &dims)) {
      Py_DECREF(seq);
      return nullptr;
    }
    Output out{name, {}, 1};
    PyObject *dseq = PySequence_Fast(dims, "add_lane: an output's dims are a list of ints");
    if (!dseq) {
      Py_DECREF(seq);
      return nullptr;
    }
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(dseq); j++) {
      long long d = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dseq, j));
      if (d < 1) {
        Py_DECREF(dseq);
        Py_DECREF(seq);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "add_lane: an output's dims are fixed and positive");
        return nullptr;
      }
      out.rest.push_back(d);
      out.size *= static_cast<size_t>(d);
    }
    Py_DECREF(dseq);
    lane->outputs.push_back(std::move(out));
  }
  Py_DECREF(seq);
  Py_INCREF(step);
  lane->step = step;
  Lane *raw = lane.get();
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    if (lanes->by_model.count(model)) {
      Py_DECREF(step);
      PyErr_Format(PyExc_ValueError, "model %s already has a lane", model);
      return nullptr;
    }
    lanes->by_model[model] = std::move(lane);
  }
  for (int i = 0; i < workers; i++) raw->workers.emplace_back([raw, i] {
    pthread_setname_np(pthread_self(), "cs-lane");  // for top -H, perf and py-spy
    raw->run(i);
  });
  Py_RETURN_NONE;
}

// add_token_lane(model, version, loop, spec, record): see token_lanes.cpp.
PyObject *lanes_add_tokens(Lanes *lanes, PyObject *args) {
  TokenLane *lane = token_lane_new(lanes->front, args);
  if (!lane) return nullptr;
  const std::string &model = token_lane_model(lane);
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    if (!lanes->by_model.count(model) && !lanes->tokens.count(model)) {
      lanes->tokens[model] = lane;
      Py_RETURN_NONE;
    }
  }
  Py_BEGIN_ALLOW_THREADS
  token_lane_stop(lane);
  Py_END_ALLOW_THREADS
  token_lane_delete(lane);
  PyErr_Format(PyExc_ValueError, "model %s already has a lane", model.c_str());
  return nullptr;
}

// flush(): the token lanes' answered requests to their statistics now (with the GIL).
void lanes_flush(Lanes *lanes) {
  std::vector<TokenLane *> tokens;
  {
    std::lock_guard<std::mutex> lock(lanes->mu);
    for (auto &kv : lanes->tokens) tokens.push_back(kv.second);
  }
  for (TokenLane *t : tokens) token_lane_flush(t);
}

// drain(): lanes open no new sessions and take no new requests (the server is shutting down); open ones go on.
void lanes_drain(Lanes *lanes) {
  std::lock_guard<std::mutex> lock(lanes->mu);
  for (auto &kv : lanes->tokens) token_lane_drain(kv.second);
  for (auto &kv : lanes->by_model) {
    std::lock_guard<std::mutex> lane_lock(kv.second->mu);
    kv.second->draining = true;
  }
}

// The sessions a model's lane holds (-1: it has none).
long lanes_sessions(Lanes *lanes, const std::string &model) {
  std::lock_guard<std::mutex> lock(lanes->mu);
  auto it = lanes->by_model.find(model);
  if (it == lanes->by_model.end()) return -1;
  std::lock_guard<std::mutex> lane_lock(it->second->mu);
  return static_cast<long>(it->second->sessions.size());
}

}  // namespace cellserve_front
