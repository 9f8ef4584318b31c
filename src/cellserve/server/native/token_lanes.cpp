// Token lanes: the stateless requests of a token model whose step loop is native (the number speller, a
// seq2seq model decoding greedily; a language model scoring its tokens), parsed, checked, admitted into the engine's running loop and answered
// here, without Python per request.
//
// The path: grpc++'s thread parses the ModelInferRequest and checks it against the model's inputs; its rows
// join the loop at the worker's next step (engine/native/loop_face.h), beside the rows the Python engine
// admits; the thread that steps hands their tokens back when they finish, and this file builds the answer there
// and posts it to the front end's poller, which writes it (Front::post). That thread is the loop's worker, or,
// where the loop was idle, the front end's own thread (token_lanes_step), so that a request at one client
// wakes no other thread. Python runs once per step that finishes
// any of them (the statistics, metrics and access lines of all of them in one call), never per request.
//
// A family whose text codec has a native form (the speller's digits in, words out: families/seq2seq.py says)
// has its text coded here; other families come with tokens only. Anything this lane does not take exactly as
// the Python path would goes to Python, which words the error or serves it: other parameters (sessions,
// priorities), unusual datatypes, ids outside the vocabulary, text the native codec does not accept, outputs
// the model lacks. So both paths give the same answers and the same errors, and Python stays the reference.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <unordered_map>

#include "front.h"
#include "lanes.h"
#include "loop_face.h"
#include "token_lanes.h"

namespace cellserve_front {

namespace {

const long long FIRST_ID = 1LL << 62;  // the engine's runner counts its row ids from 0
// Statistics go to Python in batches: one call (the GIL, and Python's allocator returning arenas) per finishing
// step cost the worker a tenth of its time at 16 clients, and stalled its steps while another thread held the GIL
const double RECORD_EVERY_S = 0.02;
const double STEP_TURN_S = 100e-6;  // token_lanes_step

// One request: its rows' tokens as they finish, what it asked for, and where the answer goes.
struct Pending {
  TokenReply reply;
  const char *protocol;
  std::string logged_id;  // the access log's name of it (the x-request-id header, else the request's id)
  std::vector<std::string> wanted;  // output names, in order, without repeats
  std::vector<std::vector<int64_t>> out;  // a generating model's tokens per row
  std::vector<double> score;              // a scoring model's log-likelihood and next token per row
  std::vector<int64_t> next;
  int left;
  double arrival;
};

bool ascii_space(char ch) { return ch == ' ' || (ch >= '\t' && ch <= '\r'); }

}  // namespace

struct TokenLane {
  Front *front;
  std::string model, version;
  PyObject *loop_ref = nullptr;  // the engine's Loop: keeps its face valid
  const cs_loop_face_t *face = nullptr;
  int stage = 0, vocab = 0;
  bool scores = false;           // a scoring model (a language model: log_likelihood, next_token) rather than
                                 // a generating one (seq2seq: tokens, lengths, text)
  int64_t eos = -1;
  int default_max_len = -1;      // -1: twice the source plus 10 (the runner's default)
  int max_inflight = 0;          // requests under way here; past it Python queues or refuses them
  // the text codec's native form (digits_max < 0: none): digits in, at most digits_chars after stripping and
  // at most digits_max; the source is the number's digits; out: words joined by spaces, unspoken ids skipped
  long long digits_max = -1;
  int digits_chars = 0;
  std::vector<std::string> words;
  std::vector<char> unspoken;
  PyObject *record = nullptr;  // record(latencies, rows, ids): statistics of the requests just answered

  std::mutex mu;
  std::unordered_map<long long, std::pair<std::shared_ptr<Pending>, int>> rows;  // row id -> (request, index)
  // answered, not yet recorded: handed to `record` by Python's dispatcher, which the worker asks (a RECORDS
  // item in the front's inbox) at most every RECORD_EVERY_S, and whenever Python reads statistics or metrics
  // (flush, through the backend's read hooks). Recorded on the worker, with the GIL, they had stopped the
  // step loop every 20 ms for 250 us, 3.7 ms with access lines (16 gRPC clients, speller).
  std::vector<double> answered_latency;
  std::vector<long> answered_rows;
  std::vector<std::string> answered_ids;
  std::vector<const char *> answered_protocols;
  double recorded_at = 0.0;
  bool records_asked = false;  // a RECORDS item is in the inbox
  long long next_id = FIRST_ID;
  int inflight = 0;
  bool draining = false, stopped = false;

  bool codec() const { return digits_max >= 0; }
  bool take(const TokenAsk &ask, const std::string &logged_id, const char *protocol, TokenReply reply,
            bool *step_here);
  void finished(const cs_loop_left_t *left, int count);
  void flush();
  std::vector<LaneTensor> answer(const Pending &p) const;
};

namespace {

void on_left(void *ctx, const cs_loop_left_t *left, int count) { static_cast<TokenLane *>(ctx)->finished(left, count); }

// The values of a gRPC request's input as its datatype says: raw contents when the request carries them (one
// per input), else the typed contents. values_ok stays false where they cannot be read so.
void read_values(const inference::ModelInferRequest &request, int index, TokenAsk::Input &in) {
  if (request.raw_input_contents_size()) {
    const std::string &raw = request.raw_input_contents(index);
    return read_raw(raw.data(), raw.size(), in);
  }
  const auto &contents = request.inputs(index).contents();
  if (in.datatype == "INT64") {
    in.ints.assign(contents.int64_contents().begin(), contents.int64_contents().end());
    in.values_ok = true;
  } else if (in.datatype == "BYTES") {
    in.texts.assign(contents.bytes_contents().begin(), contents.bytes_contents().end());
    in.values_ok = true;
  }
}

// A ModelInferResponse's output from a lane's tensor (raw contents, as the Python path answers).
void add_output(inference::ModelInferResponse &out, const LaneTensor &tensor) {
  auto *t = out.add_outputs();
  t->set_name(tensor.name);
  t->set_datatype(tensor.datatype);
  for (int64_t d : tensor.shape) t->add_shape(d);
  out.add_raw_output_contents(raw_of(tensor));
}

}  // namespace

// The speller's source from its text, as families/seq2seq.py's codec makes it; false where the codec would
// refuse it, or where Python's reading (Unicode digits and spaces) could differ from this one.
static bool digits_source(const TokenLane &lane, const std::string &text, std::vector<int64_t> &source) {
  size_t a = 0, b = text.size();
  while (a < b && ascii_space(text[a])) a++;
  while (b > a && ascii_space(text[b - 1])) b--;
  if (b == a || b - a > static_cast<size_t>(lane.digits_chars)) return false;
  long long value = 0;
  for (size_t i = a; i < b; i++) {
    if (text[i] < '0' || text[i] > '9') return false;
    value = value * 10 + (text[i] - '0');
  }
  if (value > lane.digits_max) return false;
  source.clear();
  const std::string digits = std::to_string(value);
  for (char ch : digits) source.push_back(ch - '0');
  return true;
}

bool TokenLane::take(const TokenAsk &ask, const std::string &logged_id, const char *protocol, TokenReply reply,
                     bool *step_here) {
  if (!ask.version.empty() && ask.version != version) return false;
  if (ask.parameters) return false;  // sessions and every other parameter: Python's
  const size_t n_inputs = ask.inputs.size();
  if (n_inputs < 1 || n_inputs > 2) return false;
  std::vector<std::vector<int64_t>> sources;
  std::vector<int64_t> limits;
  bool has_source = false, has_limit = false;
  for (const auto &tensor : ask.inputs) {
    if (tensor.parameters || !tensor.values_ok) return false;
    size_t count = 1;
    for (int64_t d : tensor.shape) {
      if (d < 1 || d > (1 << 24)) return false;
      count *= static_cast<size_t>(d);
      if (count > (1 << 24)) return false;
    }
    if (tensor.name == "tokens" && !has_source) {
      has_source = true;
      if (tensor.datatype != "INT64" || tensor.shape.size() < 1 || tensor.shape.size() > 2) return false;
      const size_t length = static_cast<size_t>(tensor.shape.back());
      const auto &values = tensor.ints;
      if (values.size() != count) return false;
      for (int64_t t : values)
        if (t < 0 || t >= vocab) return false;
      for (size_t at = 0; at < count; at += length) sources.emplace_back(values.begin() + at, values.begin() + at + length);
    } else if (tensor.name == "text" && codec() && !scores && !has_source) {
      has_source = true;
      if (tensor.datatype != "BYTES" || tensor.shape.size() < 1 || tensor.texts.size() != count) return false;
      sources.resize(count);
      for (size_t r = 0; r < count; r++)
        if (!digits_source(*this, tensor.texts[r], sources[r])) return false;
    } else if (tensor.name == "max_output_tokens" && !scores && !has_limit) {
      has_limit = true;
      if (tensor.datatype != "INT64" || tensor.shape.size() < 1 || tensor.ints.size() != count) return false;
      limits = tensor.ints;
      for (int64_t v : limits)
        if (v < 1 || v > 4096) return false;
    } else {
      return false;
    }
  }
  if (!has_source || sources.empty()) return false;
  if (has_limit && limits.size() != 1 && limits.size() != sources.size()) return false;
  auto pending = std::make_shared<Pending>();
  for (const auto &asked : ask.outputs) {
    const std::string &name = asked.name;
    const bool known = scores ? (name == "log_likelihood" || name == "next_token")
                              : (name == "tokens" || name == "lengths" || (name == "text" && codec()));
    if (asked.parameters || !known) return false;
    if (std::find(pending->wanted.begin(), pending->wanted.end(), name) == pending->wanted.end())
      pending->wanted.push_back(name);
  }
  if (pending->wanted.empty()) {
    pending->wanted = scores ? std::vector<std::string>{"log_likelihood", "next_token"}
                             : std::vector<std::string>{"tokens", "lengths"};
    if (codec() && !scores) pending->wanted.push_back("text");
  }
  const int n = static_cast<int>(sources.size());
  pending->reply = std::move(reply);
  pending->protocol = protocol;
  pending->logged_id = logged_id.empty() ? ask.id : logged_id;
  pending->out.resize(n);
  pending->score.resize(n);
  pending->next.resize(n);
  pending->left = n;
  pending->arrival = now_s();
  std::vector<cs_loop_row_t> admitted(n);
  int how;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (draining || stopped || inflight >= max_inflight || !face->running(face->loop)) return false;
    for (int r = 0; r < n; r++) {
      int max_len = scores      ? 1  // (a scoring row reads its tokens and leaves)
                    : has_limit ? static_cast<int>(limits[limits.size() == 1 ? 0 : r])
                    : default_max_len > 0 ? default_max_len : 2 * static_cast<int>(sources[r].size()) + 10;
      admitted[r] = {stage, next_id + r, sources[r].data(), static_cast<int>(sources[r].size()), max_len, 1,
                     pending->arrival};
    }
    how = face->admit(face->loop, admitted.data(), n, 1);
    if (!how) return false;
    for (int r = 0; r < n; r++) rows[next_id + r] = {pending, r};
    next_id += n;
    inflight++;
  }
  *step_here = how == 2;
  return true;
}

// On the thread that stepped: the rows that finished; the requests whose last row this was are answered.
void TokenLane::finished(const cs_loop_left_t *left, int count) {
  std::vector<std::shared_ptr<Pending>> done;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < count; i++) {
      auto it = rows.find(left[i].id);
      if (it == rows.end()) continue;
      auto pending = it->second.first;
      const int r = it->second.second;
      pending->out[r].assign(left[i].tokens, left[i].tokens + left[i].count);
      pending->score[r] = left[i].score;
      pending->next[r] = left[i].next_token;
      rows.erase(it);
      if (--pending->left == 0) {
        done.push_back(std::move(pending));
        inflight--;
      }
    }
  }
  if (done.empty()) return;
  const double now = now_s();
  bool due;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto &pending : done) {
      answered_latency.push_back(now - pending->arrival);
      answered_rows.push_back(static_cast<long>(pending->out.size()));
      answered_ids.push_back(pending->logged_id);
      answered_protocols.push_back(pending->protocol);
    }
    due = !records_asked && now - recorded_at >= RECORD_EVERY_S;
    records_asked = records_asked || due;
  }
  if (due) front->inbox.push(Inbound{0, RECORDS, {}, {}, {}});
  for (const auto &pending : done) pending->reply(answer(*pending));
}

// The requests answered since the last call, to Python's record(latencies, rows, ids): statistics, metrics and
// access lines. From any thread, with or without the GIL.
void TokenLane::flush() {
  std::vector<double> latency;
  std::vector<long> counts;
  std::vector<std::string> ids;
  std::vector<const char *> protocols;
  {
    std::lock_guard<std::mutex> lock(mu);
    latency.swap(answered_latency);
    counts.swap(answered_rows);
    ids.swap(answered_ids);
    protocols.swap(answered_protocols);
    recorded_at = now_s();
    records_asked = false;
  }
  if (latency.empty()) return;
  PyGILState_STATE gil = PyGILState_Ensure();
  const Py_ssize_t n = static_cast<Py_ssize_t>(latency.size());
  PyObject *latencies = PyList_New(n), *rows_list = PyList_New(n), *id_list = PyList_New(n),
           *protocol_list = PyList_New(n);
  for (Py_ssize_t i = 0; latencies && rows_list && id_list && protocol_list && i < n; i++) {
    PyList_SET_ITEM(latencies, i, PyFloat_FromDouble(latency[i]));
    PyList_SET_ITEM(rows_list, i, PyLong_FromLong(counts[i]));
    PyList_SET_ITEM(id_list, i, PyUnicode_DecodeUTF8(ids[i].data(), static_cast<Py_ssize_t>(ids[i].size()), "replace"));
    PyList_SET_ITEM(protocol_list, i, PyUnicode_FromString(protocols[i]));
  }
  PyObject *result = latencies && rows_list && id_list && protocol_list && !PyErr_Occurred()
                         ? PyObject_CallFunctionObjArgs(record, latencies, rows_list, id_list, protocol_list, nullptr)
                         : nullptr;
  if (!result) PyErr_WriteUnraisable(record);  // (these statistics are lost; the answers went out)
  Py_XDECREF(result);
  Py_XDECREF(latencies);
  Py_XDECREF(rows_list);
  Py_XDECREF(id_list);
  Py_XDECREF(protocol_list);
  PyGILState_Release(gil);
}

// The answer's outputs as the Python path makes them (families/seq2seq.py's and lm.py's outputs_of).
std::vector<LaneTensor> TokenLane::answer(const Pending &p) const {
  std::vector<LaneTensor> outputs;
  const int64_t n = static_cast<int64_t>(p.out.size());
  size_t longest = 0;
  for (const auto &row : p.out) longest = std::max(longest, row.size());
  for (const std::string &name : p.wanted) {
    LaneTensor tensor;
    tensor.name = name;
    tensor.shape = {n};
    if (name == "log_likelihood") {
      tensor.datatype = "FP64";
      tensor.reals = p.score;
    } else if (name == "next_token") {
      tensor.datatype = "INT64";
      tensor.ints = p.next;
    } else if (name == "tokens") {  // [rows, longest], shorter rows padded with EOS
      tensor.datatype = "INT64";
      tensor.shape.push_back(static_cast<int64_t>(longest));
      tensor.ints.assign(static_cast<size_t>(n) * longest, eos);
      for (int64_t r = 0; r < n; r++) std::copy(p.out[r].begin(), p.out[r].end(), tensor.ints.begin() + r * longest);
    } else if (name == "lengths") {
      tensor.datatype = "INT64";
      for (const auto &row : p.out) tensor.ints.push_back(static_cast<int64_t>(row.size()));
    } else {  // text: each row's words
      tensor.datatype = "BYTES";
      for (const auto &row : p.out) {
        std::string text;
        for (int64_t t : row) {
          if (t < 0 || t >= static_cast<int64_t>(words.size()) || unspoken[t]) continue;
          if (!text.empty()) text += ' ';
          text += words[t];
        }
        tensor.texts.push_back(std::move(text));
      }
    }
    outputs.push_back(std::move(tensor));
  }
  return outputs;
}

// --- the wires' hooks ----------------------------------------------------------------------------------------

std::string raw_of(const LaneTensor &tensor) {
  std::string raw;
  if (tensor.datatype == "BYTES") {
    for (const auto &text : tensor.texts) {
      const uint32_t size = static_cast<uint32_t>(text.size());
      raw.append(reinterpret_cast<const char *>(&size), sizeof(size));
      raw += text;
    }
  } else if (tensor.datatype == "FP64") {
    raw.assign(reinterpret_cast<const char *>(tensor.reals.data()), tensor.reals.size() * sizeof(double));
  } else {
    raw.assign(reinterpret_cast<const char *>(tensor.ints.data()), tensor.ints.size() * sizeof(int64_t));
  }
  return raw;
}

void read_raw(const char *data, size_t size, TokenAsk::Input &in) {
  if (in.datatype == "INT64") {
    if (size % sizeof(int64_t)) return;
    in.ints.resize(size / sizeof(int64_t));
    if (size) memcpy(in.ints.data(), data, size);
    in.values_ok = true;
  } else if (in.datatype == "BYTES") {
    size_t at = 0;
    while (at < size) {
      uint32_t length;
      if (size - at < sizeof(length)) return;
      memcpy(&length, data + at, sizeof(length));
      at += sizeof(length);
      if (size - at < length) return;
      in.texts.emplace_back(data + at, length);
      at += length;
    }
    in.values_ok = true;
  }
}

bool token_lane_take(TokenLane *lane, const TokenAsk &ask, const std::string &logged_id, const char *protocol,
                     TokenReply reply, bool *step_here) {
  return lane->take(ask, logged_id, protocol, std::move(reply), step_here);
}

// Each lane's loop steps back to back for up to a turn, then the caller's I/O runs: polling its sockets
// between every two steps cost a syscall each (at one gRPC client 157 -> 129 us of server CPU per request
// outside the kernels, side by side), and a turn keeps short the wait of connections with something to read.
void token_lanes_step(std::vector<TokenLane *> &lanes) {
  auto idle = [](TokenLane *lane) {
    const double until = now_s() + STEP_TURN_S;
    while (lane->face->step(lane->face->loop))
      if (now_s() >= until) return false;
    return true;
  };
  lanes.erase(std::remove_if(lanes.begin(), lanes.end(), idle), lanes.end());
}

const std::string &token_lane_version(const TokenLane *lane) { return lane->version; }

bool token_lane_scores(const TokenLane *lane) { return lane->scores; }

// gRPC (lanes.cpp): a ModelInferRequest read into a TokenAsk; the answer encoded as grpc_service.encode_response
// does, inside a ModelStreamInferResponse on a stream, and written to its call.
Offer token_lane_offer(TokenLane *lane, const inference::ModelInferRequest &request, uint64_t call, bool stream,
                       const std::string &logged_id) {
  if (request.raw_input_contents_size() && request.raw_input_contents_size() != request.inputs_size()) return Offer{};
  TokenAsk ask;
  ask.version = request.model_version();
  ask.id = request.id();
  ask.parameters = !request.parameters().empty();
  for (int i = 0; i < request.inputs_size(); i++) {
    const auto &tensor = request.inputs(i);
    TokenAsk::Input in;
    in.name = tensor.name();
    in.datatype = tensor.datatype();
    in.shape.assign(tensor.shape().begin(), tensor.shape().end());
    in.parameters = !tensor.parameters().empty();
    read_values(request, i, in);
    ask.inputs.push_back(std::move(in));
  }
  for (const auto &asked : request.outputs()) ask.outputs.push_back({asked.name(), !asked.parameters().empty()});
  Front *front = lane->front;
  const std::string model = lane->model, version = lane->version, id = request.id();
  TokenReply reply = [front, call, stream, model, version, id](std::vector<LaneTensor> &&outputs) {
    LaneAnswer envelope(stream, model, version, id);
    for (const auto &tensor : outputs) add_output(envelope.response(), tensor);
    front->post(call, envelope.bytes(), !stream);
  };
  bool step_here = false;
  if (!lane->take(ask, logged_id, "grpc", std::move(reply), &step_here)) return Offer{};
  Offer taken;
  taken.what = Offer::TAKEN;
  if (step_here) taken.step = lane;
  return taken;
}

// add_token_lane(model, version, loop, spec, record) with the GIL; spec (families' lane_spec): stage, scores (a
// scoring model), eos, max_inflight, default_max_len, and for a text codec digits_max, digits_chars, words,
// unspoken.
TokenLane *token_lane_new(Front *front, PyObject *args) {
  const char *model, *version;
  PyObject *loop, *spec, *record;
  if (!PyArg_ParseTuple(args, "ssOO!O", &model, &version, &loop, &PyDict_Type, &spec, &record)) return nullptr;
  if (!PyCallable_Check(record)) {
    PyErr_SetString(PyExc_TypeError, "add_token_lane: record must be callable");
    return nullptr;
  }
  PyObject *capsule = PyObject_CallMethod(loop, "lane_face", nullptr);
  if (!capsule) return nullptr;
  auto *face = static_cast<const cs_loop_face_t *>(PyCapsule_GetPointer(capsule, CELLSERVE_LOOP_FACE));
  Py_DECREF(capsule);  // (the face lives in the loop, which the lane holds)
  if (!face) return nullptr;
  if (face->version != CELLSERVE_LOOP_FACE_VERSION) {
    PyErr_Format(PyExc_ImportError, "the step loop's face is version %d, the front end needs %d: rebuild",
                 face->version, CELLSERVE_LOOP_FACE_VERSION);
    return nullptr;
  }
  auto integer = [&](const char *key, long long fallback) -> long long {
    PyObject *v = PyDict_GetItemString(spec, key);
    return v ? PyLong_AsLongLong(v) : fallback;
  };
  auto lane = std::make_unique<TokenLane>();
  lane->front = front;
  lane->model = model;
  lane->version = version;
  lane->face = face;
  lane->stage = static_cast<int>(integer("stage", 0));
  lane->scores = integer("scores", 0) != 0;
  lane->eos = integer("eos", -1);
  lane->max_inflight = static_cast<int>(integer("max_inflight", 0));
  lane->default_max_len = static_cast<int>(integer("default_max_len", -1));
  lane->digits_max = integer("digits_max", -1);
  lane->digits_chars = static_cast<int>(integer("digits_chars", 0));
  if (PyErr_Occurred()) return nullptr;
  lane->vocab = face->vocab(face->loop, lane->stage);
  if (lane->vocab < 1 || lane->max_inflight < 1 || (lane->codec() && lane->digits_chars < 1)) {
    PyErr_SetString(PyExc_ValueError, "add_token_lane: no such token stage, or limits that are not positive");
    return nullptr;
  }
  if (lane->codec()) {
    PyObject *words = PyDict_GetItemString(spec, "words"), *unspoken = PyDict_GetItemString(spec, "unspoken");
    PyObject *seq = words ? PySequence_Fast(words, "add_token_lane: words is a list of str") : nullptr;
    if (!seq) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "add_token_lane: a text codec needs its words");
      return nullptr;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
      Py_ssize_t size;
      const char *word = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &size);
      if (!word) {
        Py_DECREF(seq);
        return nullptr;
      }
      lane->words.emplace_back(word, size);
    }
    Py_DECREF(seq);
    lane->unspoken.assign(lane->words.size(), 0);
    PyObject *useq = unspoken ? PySequence_Fast(unspoken, "add_token_lane: unspoken is a list of ids") : nullptr;
    for (Py_ssize_t i = 0; useq && i < PySequence_Fast_GET_SIZE(useq); i++) {
      long long t = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(useq, i));
      if (t >= 0 && t < static_cast<long long>(lane->unspoken.size())) lane->unspoken[t] = 1;
    }
    Py_XDECREF(useq);
    if (PyErr_Occurred()) return nullptr;
  }
  Py_INCREF(loop);
  Py_INCREF(record);
  lane->loop_ref = loop;
  lane->record = record;
  TokenLane *raw = lane.release();
  Py_BEGIN_ALLOW_THREADS  // (listen waits out a call of the worker's, which may want the GIL)
  face->listen(face->loop, FIRST_ID, on_left, raw);
  Py_END_ALLOW_THREADS
  return raw;
}

const std::string &token_lane_model(const TokenLane *lane) { return lane->model; }

void token_lane_flush(TokenLane *lane) { lane->flush(); }

void token_lane_drain(TokenLane *lane) {
  std::lock_guard<std::mutex> lock(lane->mu);
  lane->draining = true;
}

// Without the GIL: the loop forgets this lane (its rows still running leave through the engine's outbox,
// which drops them unknown), the lane takes no more, and what it answered is recorded.
void token_lane_stop(TokenLane *lane) {
  {
    std::lock_guard<std::mutex> lock(lane->mu);
    if (lane->stopped) return;
    lane->stopped = true;
  }
  lane->face->listen(lane->face->loop, 0, nullptr, nullptr);
  lane->flush();
}

void token_lane_delete(TokenLane *lane) {  // with the GIL, after token_lane_stop
  Py_XDECREF(lane->record);
  Py_XDECREF(lane->loop_ref);
  delete lane;
}

}  // namespace cellserve_front
