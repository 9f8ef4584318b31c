// The HTTP/1.1 wire in native code: sockets, HTTP parsing, keep-alive, body limits and TLS are Boost.Beast's and
// Boost.Asio's (the distribution's Boost), JSON is RapidJSON's. It answers inference requests of models with a
// token lane (token_lanes.cpp) without Python; every other request (health, metadata, repository, statistics,
// /metrics, the live page, /docs, WebSocket upgrades, and any inference request a lane does not take exactly as
// Python would) is passed on, as it came, to the FastAPI app served by uvicorn on a Unix socket in this
// process, and its answer passed back. So each route keeps one implementation, and the port is one.
//
// One thread runs every connection (Asio's io_context); the lanes' answers are posted to it from the step
// loop's worker. A connection reads its next request only once the last is answered (HTTP/1.1 order).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <pthread.h>
#include <rapidjson/document.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "http_front.h"
#include "token_lanes.h"
#include "websocket_front.h"

namespace cellserve_front {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using local = asio::local::stream_protocol;

namespace {

const char HEADER_LENGTH[] = "Inference-Header-Content-Length";
const auto READ_TIMEOUT = std::chrono::seconds(60);  // a request's header and body, and an idle keep-alive
const size_t HEADER_LIMIT = 1 << 16;
// (not boost::none: Beast 1.74 compares a length with an empty limit as exceeding it)
const uint64_t NO_LIMIT = std::numeric_limits<uint64_t>::max();

// An answer the lane hands back, for the connection's thread to write.
struct Answer {
  std::string body, header_length;  // header_length: the binary tensor extension's JSON size, else empty
};

// JSON string contents as orjson writes them (the Python path's encoder): quotes, backslashes and control
// characters escaped, everything else as it is.
void json_string(std::string &out, const std::string &text) {
  static const char HEX[] = "0123456789abcdef";
  out += '"';
  for (unsigned char ch : text) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (ch < 0x20) {
          out += "\\u00";
          out += HEX[ch >> 4];
          out += HEX[ch & 15];
        } else {
          out += static_cast<char>(ch);
        }
    }
  }
  out += '"';
}

// What the HTTP request asked beyond the lane's TokenAsk: how to encode the answer.
struct HttpAsk {
  TokenAsk ask;
  bool has_id = false, binary_outputs = false;
  std::vector<std::pair<std::string, bool>> binary;  // output name -> binary_data (the last one given, as Python)
  bool binary_for(const std::string &name) const {
    bool value = false;
    for (const auto &kv : binary)
      if (kv.first == name) value = kv.second;
    return value || binary_outputs;
  }
};

// The body as protocol.build_response writes it: JSON (orjson's layout), or a JSON header and the binary
// tensors of the outputs asked for in binary.
Answer encode(const HttpAsk &request, const std::string &model, const std::string &version,
              const std::vector<LaneTensor> &outputs) {
  std::string json = "{\"model_name\":", blobs;
  json_string(json, model);
  json += ",\"model_version\":";
  json_string(json, version);
  json += ",\"outputs\":[";
  for (size_t i = 0; i < outputs.size(); i++) {
    const LaneTensor &tensor = outputs[i];
    if (i) json += ',';
    json += "{\"name\":";
    json_string(json, tensor.name);
    json += ",\"shape\":[";
    for (size_t d = 0; d < tensor.shape.size(); d++) json += (d ? "," : "") + std::to_string(tensor.shape[d]);
    json += "],\"datatype\":";
    json_string(json, tensor.datatype);
    if (request.binary_for(tensor.name)) {
      const std::string blob = raw_of(tensor);
      json += ",\"parameters\":{\"binary_data_size\":" + std::to_string(blob.size()) + "}}";
      blobs += blob;
      continue;
    }
    json += ",\"data\":[";
    if (tensor.datatype == "BYTES") {
      for (size_t k = 0; k < tensor.texts.size(); k++) {
        if (k) json += ',';
        json_string(json, tensor.texts[k]);
      }
    } else {  // (FP64 is asked for in binary only: take() sends JSON reals to Python, whose float format rules)
      for (size_t k = 0; k < tensor.ints.size(); k++) json += (k ? "," : "") + std::to_string(tensor.ints[k]);
    }
    json += "]}";
  }
  json += ']';
  if (request.has_id) {
    json += ",\"id\":";
    json_string(json, request.ask.id);
  }
  json += '}';
  Answer answer;
  if (!blobs.empty()) answer.header_length = std::to_string(json.size());
  answer.body = std::move(json) + blobs;
  return answer;
}

// --- reading a request as the lane's: anything Python would read differently goes to Python -------------

using Value = rapidjson::Value;

bool unique_keys(const Value &object) {
  for (auto a = object.MemberBegin(); a != object.MemberEnd(); ++a)
    for (auto b = a + 1; b != object.MemberEnd(); ++b)
      if (a->name == b->name) return false;
  return true;
}

// An object Python reads with `x or {}`: absent, null or an object (with no repeated keys); out: it, or null.
bool optional_object(const Value &parent, const char *key, const Value *&out) {
  out = nullptr;
  auto it = parent.FindMember(key);
  if (it == parent.MemberEnd() || it->value.IsNull()) return true;
  if (!it->value.IsObject() || !unique_keys(it->value)) return false;
  out = &it->value;
  return true;
}

bool read_input(const Value &spec, const char *binary, size_t binary_size, size_t &offset, TokenAsk::Input &in) {
  if (!spec.IsObject() || !unique_keys(spec)) return false;
  auto name = spec.FindMember("name"), shape = spec.FindMember("shape"), datatype = spec.FindMember("datatype");
  if (name == spec.MemberEnd() || !name->value.IsString() || shape == spec.MemberEnd() || !shape->value.IsArray() ||
      datatype == spec.MemberEnd() || !datatype->value.IsString())
    return false;
  in.name.assign(name->value.GetString(), name->value.GetStringLength());
  in.datatype.assign(datatype->value.GetString(), datatype->value.GetStringLength());
  for (const auto &d : shape->value.GetArray()) {
    if (!d.IsInt64() || d.GetInt64() < 0) return false;
    in.shape.push_back(d.GetInt64());
  }
  if (in.datatype != "INT64" && in.datatype != "BYTES") return false;
  const Value *params;
  if (!optional_object(spec, "parameters", params)) return false;
  if (params && params->MemberCount()) {
    auto size = params->FindMember("binary_data_size");
    if (size == params->MemberEnd() || params->MemberCount() != 1 || !size->value.IsUint64()) return false;
    const uint64_t bytes = size->value.GetUint64();
    if (bytes > binary_size - offset) return false;
    read_raw(binary + offset, bytes, in);  // (values_ok false where the bytes do not parse: Python's)
    offset += bytes;
    return true;
  }
  auto data = spec.FindMember("data");
  if (data == spec.MemberEnd() || !data->value.IsArray()) return false;
  for (const auto &v : data->value.GetArray()) {  // flat lists only (Python reads nested ones too)
    if (in.datatype == "INT64") {
      if (!v.IsInt64()) return false;
      in.ints.push_back(v.GetInt64());
    } else {
      if (!v.IsString()) return false;
      in.texts.emplace_back(v.GetString(), v.GetStringLength());
    }
  }
  in.values_ok = true;
  return true;
}

bool read_request(const std::string &body, const std::string *header_length, HttpAsk &out) {
  size_t split = body.size();
  if (header_length) {
    if (header_length->empty() || header_length->size() > 18) return false;
    split = 0;
    for (char ch : *header_length) {
      if (ch < '0' || ch > '9') return false;
      split = split * 10 + static_cast<size_t>(ch - '0');
    }
    if (split == 0 || split > body.size()) return false;
  }
  // \u escapes: Python's reading of surrogates differs from RapidJSON's (and a lane's text is plain ASCII)
  if (std::string_view(body.data(), split).find("\\u") != std::string_view::npos) return false;
  rapidjson::Document doc;
  doc.Parse<rapidjson::kParseValidateEncodingFlag>(body.data(), split);
  if (doc.HasParseError() || !doc.IsObject() || !unique_keys(doc)) return false;
  const char *binary = body.data() + split;
  const size_t binary_size = body.size() - split;
  auto id = doc.FindMember("id");
  if (id != doc.MemberEnd() && !id->value.IsNull()) {
    if (!id->value.IsString()) return false;  // (Python writes str() of a number or a boolean)
    out.has_id = true;
    out.ask.id.assign(id->value.GetString(), id->value.GetStringLength());
  }
  const Value *params;
  if (!optional_object(doc, "parameters", params)) return false;
  if (params && params->MemberCount()) {
    auto flag = params->FindMember("binary_data_output");
    if (flag == params->MemberEnd() || params->MemberCount() != 1 || !flag->value.IsBool()) {
      out.ask.parameters = true;  // (sessions and the rest: Python's)
      return true;
    }
    out.binary_outputs = flag->value.GetBool();
  }
  auto inputs = doc.FindMember("inputs");
  if (inputs == doc.MemberEnd() || !inputs->value.IsArray() || inputs->value.Empty()) return false;
  size_t offset = 0;
  for (const auto &spec : inputs->value.GetArray()) {
    TokenAsk::Input in;
    if (!read_input(spec, binary, binary_size, offset, in)) return false;
    for (const auto &seen : out.ask.inputs)
      if (seen.name == in.name) return false;
    out.ask.inputs.push_back(std::move(in));
  }
  if (offset != binary_size) return false;
  auto outputs = doc.FindMember("outputs");
  if (outputs != doc.MemberEnd() && !outputs->value.IsNull()) {
    if (!outputs->value.IsArray()) return false;
    for (const auto &spec : outputs->value.GetArray()) {
      if (!spec.IsObject() || !unique_keys(spec)) return false;
      auto name = spec.FindMember("name");
      if (name == spec.MemberEnd() || !name->value.IsString()) return false;
      TokenAsk::Output asked{std::string(name->value.GetString(), name->value.GetStringLength()), false};
      const Value *oparams;
      if (!optional_object(spec, "parameters", oparams)) return false;
      bool binary_data = false;
      if (oparams && oparams->MemberCount()) {
        auto flag = oparams->FindMember("binary_data");
        if (flag == oparams->MemberEnd() || oparams->MemberCount() != 1 || !flag->value.IsBool()) return false;
        binary_data = flag->value.GetBool();
      }
      out.binary.emplace_back(asked.name, binary_data);
      out.ask.outputs.push_back(std::move(asked));
    }
  }
  return true;
}

// "/v2/models/{name}[/versions/{version}]/infer" (no query, nothing percent-encoded: Python decodes those)
bool infer_target(std::string_view target, std::string &model, std::string &version) {
  const std::string_view prefix = "/v2/models/", suffix = "/infer";
  if (target.size() <= prefix.size() + suffix.size() || target.substr(0, prefix.size()) != prefix ||
      target.substr(target.size() - suffix.size()) != suffix || target.find_first_of("%?#") != std::string_view::npos)
    return false;
  std::string_view rest = target.substr(prefix.size(), target.size() - prefix.size() - suffix.size());
  const size_t slash = rest.find('/');
  if (slash == std::string_view::npos) {
    model.assign(rest);
    version.clear();
    return !model.empty();
  }
  const std::string_view versions = "/versions/";
  if (rest.substr(slash, versions.size()) != versions) return false;
  model.assign(rest.substr(0, slash));
  version.assign(rest.substr(slash + versions.size()));
  return !model.empty() && !version.empty() && version.find('/') == std::string::npos;
}

}  // namespace

// {"error": message} as the Python path's json.dumps writes it (its messages here are ASCII)
std::string error_json(const std::string &message) {
  std::string body = "{\"error\": ";
  json_string(body, message);
  return body + "}";
}

// --- the server --------------------------------------------------------------------------------------------

struct HttpConn {
  virtual ~HttpConn() = default;
  virtual void deliver(Answer &&answer) = 0;  // on the io thread
};

struct HttpFront {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::optional<asio::ssl::context> tls;
  std::string upstream;  // the Unix socket of the FastAPI app's uvicorn
  size_t max_body = 0;
  Lanes *lanes = nullptr;
  std::string id_prefix;
  std::atomic<uint64_t> next_id{uint64_t(1) << 39};  // (Python's request ids count from 0 with the same prefix)
  std::thread thread;
  int port = 0;
  std::atomic<int> busy{0};  // connections with a request read (or being read) and not answered yet
  std::atomic<bool> draining{false};  // answers close their connections; stop waits for the busy ones
  // keeps the thread running while every connection waits for a lane's answer (no operation pending) and
  // the acceptor is closed (draining)
  asio::executor_work_guard<asio::io_context::executor_type> work = asio::make_work_guard(io);

  void accept();
  // The io thread's own: token lanes whose idle loop it steps itself, one turn (token_lanes_step) per pass of
  // its queue, between the connections' I/O (a request at one client then wakes no other thread: loop_face.h)
  std::vector<TokenLane *> stepping;
  bool step_posted = false;
  void step_soon(TokenLane *lane) {
    if (std::find(stepping.begin(), stepping.end(), lane) == stepping.end()) stepping.push_back(lane);
    if (!step_posted) post_steps();
  }
  void post_steps() {
    step_posted = true;
    asio::post(io, [this] {
      step_posted = false;
      token_lanes_step(stepping);
      if (!stepping.empty()) post_steps();
    });
  }
  std::string new_request_id() {
    char digits[16];
    snprintf(digits, sizeof digits, "%010llx", static_cast<unsigned long long>(next_id++ & 0xFFFFFFFFFFULL));
    return id_prefix + digits;
  }
};

namespace {

template <class Stream>
class Conn : public HttpConn, public std::enable_shared_from_this<Conn<Stream>> {
 public:
  template <class... Args>
  Conn(HttpFront *front, std::string peer, Args &&...args)
      : front_(front), peer_(std::move(peer)), stream_(std::forward<Args>(args)...), up_(front->io) {}

  void start() {
    if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
      read_header();
    } else {
      beast::get_lowest_layer(stream_).expires_after(READ_TIMEOUT);
      stream_.async_handshake(asio::ssl::stream_base::server, [self = this->shared_from_this()](beast::error_code ec) {
        if (!ec) self->read_header();
      });
    }
  }

  void deliver(Answer &&answer) override {
    auto res = std::make_shared<http::response<http::string_body>>(http::status::ok, request_.version());
    if (answer.header_length.empty()) {
      res->set(http::field::content_type, "application/json");
    } else {
      res->set(http::field::content_type, "application/octet-stream");
      res->set(HEADER_LENGTH, answer.header_length);
    }
    bool printable = true;  // (a body's id may hold what no header can)
    for (unsigned char ch : request_id_) printable = printable && ch >= 0x20 && ch < 0x7f;
    if (printable) res->set("X-Request-ID", request_id_);
    res->body() = std::move(answer.body);
    send(std::move(res));
  }

 private:
  void read_header() {
    parser_.emplace();
    parser_->header_limit(HEADER_LIMIT);
    parser_->body_limit(NO_LIMIT);  // (a declared length is checked in on_header, which words the refusal)
    beast::get_lowest_layer(stream_).expires_after(READ_TIMEOUT);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = this->shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  void on_header(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == beast::error::timeout ||
        ec == asio::error::connection_reset || ec == asio::error::operation_aborted)
      return close();
    if (!busy_) {
      busy_ = true;
      front_->busy++;
    }
    if (ec) return refuse(http::status::bad_request, "text/plain; charset=utf-8", "Invalid HTTP request received.");
    const auto declared = parser_->content_length();
    if (declared && *declared > front_->max_body)
      return refuse(http::status::payload_too_large, "application/json",
                    error_json("request body of " + std::to_string(*declared) + " bytes exceeds the limit of " +
                               std::to_string(front_->max_body) + " bytes"));
    parser_->body_limit(front_->max_body);  // (a chunked body)
    auto &head = parser_->get();
    auto expect = head.find(http::field::expect);
    if (expect != head.end() && beast::iequals(expect->value(), "100-continue")) {
      head.erase(http::field::expect);  // (answered here; the app behind gets the body whole)
      auto go_on = std::make_shared<http::response<http::empty_body>>(http::status::continue_, head.version());
      return http::async_write(stream_, *go_on, [self = this->shared_from_this(), go_on](beast::error_code e, size_t) {
        if (e) return self->close();
        self->read_body();
      });
    }
    read_body();
  }

  void read_body() {
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, size_t) { self->on_request(ec); });
  }

  void on_request(beast::error_code ec) {
    if (ec == http::error::body_limit)
      return refuse(http::status::payload_too_large, "application/json",
                    error_json("request body exceeds the limit of " + std::to_string(front_->max_body) + " bytes"));
    if (ec) return close();
    request_ = parser_->release();
    beast::get_lowest_layer(stream_).expires_never();
    if (open_websocket()) return;
    if (!take()) forward(false);
  }

  // A WebSocket upgrade a stream lane serves: the connection becomes its session (websocket_front.cpp).
  bool open_websocket() {
    WsPlan plan;
    if (!front_->lanes || !beast::websocket::is_upgrade(request_) ||
        !ws_plan(front_->lanes, std::string_view(request_.target().data(), request_.target().size()),
                 front_->max_body, plan))
      return false;
    done();
    closed_ = true;  // (the stream is the session's now)
    ws_open(std::move(stream_), std::move(request_), std::move(plan));
    return true;
  }

  // The request answered by a token lane: true when one took it.
  bool take() {
    std::string model, version;
    if (request_.method() != http::verb::post || !front_->lanes ||
        !infer_target(std::string_view(request_.target().data(), request_.target().size()), model, version) ||
        request_.find(http::field::upgrade) != request_.end())
      return false;
    TokenLane *lane = lanes_token_lane(front_->lanes, model);
    if (!lane) return false;
    auto length = request_.find(HEADER_LENGTH);
    std::string header_length;
    if (length != request_.end()) header_length.assign(length->value().data(), length->value().size());
    auto ask = std::make_shared<HttpAsk>();
    if (!read_request(request_.body(), length != request_.end() ? &header_length : nullptr, *ask)) return false;
    ask->ask.version = version;
    if (token_lane_scores(lane))  // reals in JSON: Python's float format is orjson's; binary only here
      for (const auto &out : ask->ask.outputs.empty() ? std::vector<TokenAsk::Output>{{"log_likelihood", false}}
                                                      : ask->ask.outputs)
        if (out.name == "log_likelihood" && !ask->binary_for(out.name)) return false;
    auto given = request_.find("x-request-id");  // the request's name, as the Python path's: header, id, new
    request_id_ = given != request_.end() && !given->value().empty() ? std::string(given->value())
                  : !ask->ask.id.empty()                              ? ask->ask.id
                                                                      : front_->new_request_id();
    HttpFront *front = front_;
    auto self = this->shared_from_this();  // (the connection waits for its answer: nothing else holds it)
    const std::string model_name = model, served_version = token_lane_version(lane);
    TokenReply reply = [front, self, ask, model_name, served_version](std::vector<LaneTensor> &&outputs) {
      Answer answer = encode(*ask, model_name, served_version, outputs);
      asio::post(front->io, [self, answer = std::move(answer)]() mutable { self->deliver(std::move(answer)); });
    };
    bool step_here = false;
    if (!token_lane_take(lane, ask->ask, request_id_, "http", std::move(reply), &step_here)) return false;
    if (step_here) front->step_soon(lane);
    return true;
  }

  // --- passing a request to the app behind, and its answer back ---

  void forward(bool retry) {
    if (!retry) {
      request_.erase(http::field::expect);
      request_.set("X-Forwarded-For", peer_);
      request_.set("X-Forwarded-Proto", std::is_same_v<Stream, beast::tcp_stream> ? "http" : "https");
      request_.prepare_payload();
    }
    if (up_.is_open()) return write_upstream(!retry);
    up_.async_connect(local::endpoint(front_->upstream), [self = this->shared_from_this()](beast::error_code ec) {
      if (ec) return self->unavailable();
      self->write_upstream(false);
    });
  }

  void write_upstream(bool reused) {
    http::async_write(up_, request_, [self = this->shared_from_this(), reused](beast::error_code ec, size_t) {
      if (ec) return self->upstream_failed(reused);
      self->up_parser_.emplace();
      self->up_parser_->body_limit(NO_LIMIT);
      self->up_parser_->skip(self->request_.method() == http::verb::head);
      http::async_read(self->up_, self->up_buffer_, *self->up_parser_,
                       [self, reused](beast::error_code e, size_t) { self->on_upstream(e, reused); });
    });
  }

  // A kept connection to the app may have been closed by it meanwhile: once, a fresh one.
  void upstream_failed(bool reused) {
    beast::error_code ignored;
    up_.close(ignored);
    up_buffer_.clear();
    if (reused) return forward(true);
    unavailable();
  }

  void unavailable() {
    refuse(http::status::service_unavailable, "application/json", error_json("the server is shutting down"));
  }

  void on_upstream(beast::error_code ec, bool reused) {
    if (ec) return upstream_failed(reused && !up_parser_->got_some());
    auto res = std::make_shared<http::response<http::string_body>>(up_parser_->release());
    if (res->result() == http::status::switching_protocols) return upgrade(std::move(res));
    if (!res->keep_alive()) {
      beast::error_code ignored;
      up_.close(ignored);
      up_buffer_.clear();
    }
    send(std::move(res), false);
  }

  // A WebSocket (or other) upgrade the app accepted: from here on bytes pass both ways as they are.
  void upgrade(std::shared_ptr<http::response<http::string_body>> res) {
    http::async_write(stream_, *res, [self = this->shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec) return self->close();
      self->pump(self->stream_, self->up_, self->buffer_);    // client -> app (what was read ahead first)
      self->pump(self->up_, self->stream_, self->up_buffer_);  // app -> client
    });
  }

  // Bytes from one side to the other until either closes: what `buffer` holds is written first, then read on.
  template <class From, class To>
  void pump(From &from, To &to, beast::flat_buffer &buffer) {
    auto self = this->shared_from_this();
    if (buffer.size()) {
      return asio::async_write(to, buffer.data(), [self, &from, &to, &buffer](beast::error_code ec, size_t n) {
        if (ec) return self->close();
        buffer.consume(n);
        self->pump(from, to, buffer);
      });
    }
    from.async_read_some(buffer.prepare(1 << 16), [self, &from, &to, &buffer](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      buffer.commit(n);
      self->pump(from, to, buffer);
    });
  }

  // --- answering ---

  // own: an answer made here (its length set here); else the app's, passed on as it came
  void send(std::shared_ptr<http::response<http::string_body>> res, bool own = true) {
    const bool keep = request_.keep_alive() && res->keep_alive() && !closing_ && !front_->draining;
    res->keep_alive(keep);
    if (own) res->prepare_payload();
    http::async_write(stream_, *res, [self = this->shared_from_this(), res, keep](beast::error_code ec, size_t) {
      self->done();
      if (ec || !keep) return self->close();
      self->read_header();
    });
  }

  // A request refused before it was read whole: answered, then the connection closes (its rest is unread).
  void refuse(http::status status, const char *type, const std::string &body) {
    closing_ = true;
    auto res = std::make_shared<http::response<http::string_body>>(status, 11);
    res->set(http::field::content_type, type);
    res->body() = body;
    send(std::move(res));
  }

  void done() {  // this request is answered (or never will be)
    if (busy_) {
      busy_ = false;
      front_->busy--;
    }
  }

  void close() {
    done();
    beast::error_code ignored;
    up_.close(ignored);
    if (closed_) return;
    closed_ = true;
    if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
      stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
      stream_.close();
    } else {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(5));
      stream_.async_shutdown([self = this->shared_from_this()](beast::error_code) {
        beast::get_lowest_layer(self->stream_).close();
      });
    }
  }

  HttpFront *front_;
  std::string peer_;
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::request<http::string_body> request_;
  std::string request_id_;
  local::socket up_;
  beast::flat_buffer up_buffer_;
  std::optional<http::response_parser<http::string_body>> up_parser_;
  bool closing_ = false, closed_ = false, busy_ = false;
};

}  // namespace

void HttpFront::accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
    if (!ec) {
      beast::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      auto remote = socket.remote_endpoint(ignored);
      std::string peer = ignored ? std::string() : remote.address().to_string();
      if (tls) {
        std::make_shared<Conn<beast::ssl_stream<beast::tcp_stream>>>(this, std::move(peer), std::move(socket), *tls)
            ->start();
      } else {
        std::make_shared<Conn<beast::tcp_stream>>(this, std::move(peer), std::move(socket))->start();
      }
    }
    accept();
  });
}

// --- the Python face's parts (grpc_front.cpp holds the object) ----------------------------------------------

HttpFront *http_new(Lanes *lanes, const std::string &host, int port, const std::string &upstream, size_t max_body,
                    const std::string &id_prefix, const char *key, const char *cert, const char *ca, std::string &error) {
  auto front = std::make_unique<HttpFront>();
  front->lanes = lanes;
  front->upstream = upstream;
  front->max_body = max_body;
  front->id_prefix = id_prefix;
  beast::error_code ec;
  if (key && cert) {
    front->tls.emplace(asio::ssl::context::tls_server);
    auto &tls = *front->tls;
    tls.set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                    asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 | asio::ssl::context::no_tlsv1_1);
    tls.use_certificate_chain(asio::buffer(cert, strlen(cert)), ec);
    if (!ec) tls.use_private_key(asio::buffer(key, strlen(key)), asio::ssl::context::pem, ec);
    if (!ec && ca) {
      tls.add_certificate_authority(asio::buffer(ca, strlen(ca)), ec);
      tls.set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
    }
    if (ec) {
      error = "TLS: " + ec.message();
      return nullptr;
    }
  }
  auto address = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec) {
    error = "cannot listen for HTTP on " + host + ": " + ec.message();
    return nullptr;
  }
  tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
  front->acceptor.open(endpoint.protocol(), ec);
  if (!ec) front->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) front->acceptor.bind(endpoint, ec);
  if (!ec) front->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    error = "cannot listen for HTTP on " + host + ":" + std::to_string(port) + ": " + ec.message();
    return nullptr;
  }
  front->port = front->acceptor.local_endpoint().port();
  front->accept();
  HttpFront *raw = front.release();
  raw->thread = std::thread([raw] {
    pthread_setname_np(pthread_self(), "cs-http");  // for top -H, perf and py-spy
    raw->io.run();
  });
  return raw;
}

int http_port(const HttpFront *front) { return front->port; }

void http_drain(HttpFront *front) {  // no new connections; the ones open close after their next answer
  front->draining = true;
  asio::post(front->io, [front] {
    beast::error_code ignored;
    front->acceptor.close(ignored);
  });
}

void http_stop(HttpFront *front, double grace_s) {  // without the GIL
  http_drain(front);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  while (front->busy > 0 && std::chrono::steady_clock::now() < deadline)  // the requests read get their answers
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  front->io.stop();
  if (front->thread.joinable()) front->thread.join();
}

void http_delete(HttpFront *front) { delete front; }  // after http_stop, and after the lanes stopped

}  // namespace cellserve_front
