// Native WebSocket sessions (websocket_front.cpp): what the HTTP front end (http_front.cpp) hands an upgrade
// to, once it has found that a stream lane serves it.
#pragma once

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <string>
#include <string_view>

namespace cellserve_front {

struct Lanes;
struct Lane;

// An upgrade a lane serves: its model's lane, the session's name and the output its binary answers carry.
struct WsPlan {
  Lane *lane = nullptr;
  std::string model, sid;  // sid empty: the server names the session
  std::string output;
  size_t max_message = 0;  // a message's bytes (the HTTP body limit), past which it is refused
};

// GET /v2/models/{name}[/versions/{v}]/stream[?sequence_id=&input=&output=] that a lane takes exactly as the
// Python front end would (anything else, percent-encoded or repeated query keys, unknown inputs or outputs,
// goes to Python, which serves or refuses it). False: not this.
bool ws_plan(Lanes *lanes, std::string_view target, size_t max_message, WsPlan &plan);

using WsRequest = boost::beast::http::request<boost::beast::http::string_body>;
// Accepts the upgrade on the connection's stream and serves the session until it closes.
void ws_open(boost::beast::tcp_stream &&stream, WsRequest &&upgrade, WsPlan &&plan);
void ws_open(boost::beast::ssl_stream<boost::beast::tcp_stream> &&stream, WsRequest &&upgrade, WsPlan &&plan);

// {"error": message}, as the Python front end's json.dumps writes it (its messages here are ASCII).
std::string error_json(const std::string &message);

}  // namespace cellserve_front
