// The native HTTP front end's face to the object Python holds (grpc_front.cpp): http_front.cpp.
#pragma once

#include <cstddef>
#include <string>

namespace cellserve_front {

struct Lanes;
struct HttpFront;

// Listening on host:port, passing what it does not answer to the app on the Unix socket `upstream`; nullptr
// with `error` set where it cannot. key, cert, ca: PEM text, or nullptr (no TLS; no client certificates).
HttpFront *http_new(Lanes *lanes, const std::string &host, int port, const std::string &upstream, size_t max_body,
                    const std::string &id_prefix, const char *key, const char *cert, const char *ca, std::string &error);
int http_port(const HttpFront *front);
void http_drain(HttpFront *front);   // accept no new connections
void http_stop(HttpFront *front, double grace_s);  // without the GIL: answers under way get grace_s, its thread ends
void http_delete(HttpFront *front);  // after http_stop and after the lanes stopped

}  // namespace cellserve_front
