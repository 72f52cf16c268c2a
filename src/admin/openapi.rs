//! The OpenAPI 3 document of the admin API, served at `/v1/openapi.json`. A test walks it
//! and calls every operation, so it cannot drift from what the server does.

use serde_json::{json, Value};

fn err(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn node(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}})
}

/// The document.
/// An IPv4 address and a port (1-65535), as a pattern.
const IPV4_PORT: &str = "^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// A drain timeout: a number and a unit, up to the 7 days surge accepts.
fn duration() -> Value {
    json!({"type": "string", "example": "300s",
        "pattern": "^(0|[0-9]{1,5}(ms|s)|[0-9]{1,4}m|[0-9]{1,2}h|[0-7]d)$",
        "description": "a duration such as 300s, 5m or 2h, at most 7 days"})
}

/// `schema`, also `null` (serde reads a null as absent).
fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
}

/// `GET /v1/autoscaler/history`'s answer.
fn history_schema() -> Value {
    let count = json!({"type": "integer", "minimum": 0});
    let sample = json!({"type": "object", "required": ["at", "desired", "in_service", "ordered"],
        "properties": {"at": {"type": "string"}, "desired": count, "in_service": count, "ordered": count}});
    json!({"type": "object", "required": ["samples"],
        "properties": {"samples": {"type": "array", "items": sample}}})
}

pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "surge admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Pool inspection and node lifecycle. Every route but /healthz and /readyz requires `Authorization: Bearer <token>`."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "security": [{"bearer": []}],
        "paths": paths(),
    })
}

/// The shapes of the API's bodies.
fn schemas() -> Value {
    json!({
                "Error": {"type": "object", "required": ["error", "detail"], "properties": {
                    "error": {"type": "string"}, "detail": {"type": "string"}}},
                "Node": {"type": "object", "required": ["id", "address", "state", "weight", "in_flight", "requests", "origin"], "properties": {
                    "id": {"type": "string"},
                    "address": {"type": "string"},
                    "state": {"type": "string", "enum": ["warming", "in_service", "draining", "down", "maint", "standby"]},
                    "weight": {"type": "integer"},
                    "in_flight": {"type": "integer"},
                    "requests": {"type": "integer"},
                    "failures": {"type": "integer"},
                    "error_rate": {"type": "number"},
                    "latency_ewma_ms": {"type": "number"},
                    "health": {"type": "object"},
                    "drain_deadline": {"type": "string", "format": "date-time", "nullable": true},
                    "drain_done": {"type": "boolean", "nullable": true},
                    "origin": {"type": "string", "enum": ["static", "local", "provisioned"]}}},
                "NodeList": {"type": "object", "required": ["pool", "nodes"], "properties": {
                    "pool": {"type": "string"}, "generation": {"type": "integer"},
                    "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}},
                "Drain": {"type": "object", "additionalProperties": false, "properties": {
                    "timeout": nullable(duration()), "force": {"type": "boolean"}}},
                "NewNode": {"type": "object", "required": ["address"], "additionalProperties": false, "properties": {
                    "id": {"type": "string", "nullable": true, "pattern": "^[A-Za-z0-9._-]+$",
                        "description": "letters, digits, - _ . (default: made from the address)"},
                    "address": {"type": "string", "pattern": IPV4_PORT,
                        "description": "IP:port; IPv6 as [addr]:port is accepted too"},
                    "weight": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1}}}
    })
}

/// Every route, its methods and answers.
fn paths() -> Value {
    let id_param =
        json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}});
    json!({
            "/healthz": {"get": {"summary": "The process is alive.", "security": [],
                "responses": {"200": {"description": "alive", "content": {"application/json": {}}}}}},
            "/readyz": {"get": {"summary": "The proxy listens and at least one node is in service.", "security": [],
                "responses": {"200": {"description": "ready", "content": {"application/json": {}}},
                              "503": {"description": "not ready", "content": {"application/json": {}}}}}},
            "/metrics": {"get": {"summary": "Prometheus text exposition.",
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}, "401": err("no or wrong token")}}},
            "/": {"get": {"summary": "The live status page (HTML; it signs in through /v1/session and polls the JSON routes).", "security": [],
                "responses": {"200": {"description": "the page", "content": {"text/html": {}}}}}},
            "/status.js": {"get": {"summary": "The status page's script.", "security": [],
                "responses": {"200": {"description": "script", "content": {"text/javascript": {}}}}}},
            "/v1/session": {
                "post": {"summary": "Trade the admin token for the status page's session cookie (HttpOnly, SameSite=Strict, 12 hours).", "security": [],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["token"], "additionalProperties": false,
                        "properties": {"token": {"type": "string"}}}}}},
                    "responses": {"204": {"description": "signed in (Set-Cookie), or no token is configured"},
                                  "400": err("malformed body"), "401": err("not the admin token"),
                                  "403": err("from another site's page"), "415": err("not JSON")}},
                "delete": {"summary": "Sign out (clears the cookie).", "security": [],
                    "responses": {"204": {"description": "signed out"}}}},
            "/v1/openapi.json": {"get": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {}}}, "401": err("no or wrong token")}}},
            "/v1/nodes": {
                "get": {"summary": "Every node of the pool.",
                    "responses": {"200": {"description": "the pool", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeList"}}}},
                                  "401": err("no or wrong token")}},
                "post": {"summary": "Add a static node; it takes traffic once health checks pass.",
                    "requestBody": {"required": true, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/NewNode"},
                        "example": {"id": "web-9", "address": "127.0.0.1:9", "weight": 1}}}},
                    "responses": {"201": node("added (warming)"), "400": err("bad body"), "401": err("no or wrong token"),
                                  "409": err("id or address already in the pool"), "413": err("body too large")}}
            },
            "/v1/nodes/{id}": {
                "parameters": [id_param.clone()],
                "get": {"summary": "One node.",
                    "responses": {"200": node("the node"), "401": err("no or wrong token"), "404": err("no such node")}},
                "delete": {"summary": "Drain the node, then remove it from the pool; a provisioned node's server is then released to the provider.",
                    "parameters": [{"name": "timeout", "in": "query", "schema": duration()},
                                   {"name": "force", "in": "query", "schema": {"type": "boolean"}}],
                    "responses": {"202": node("draining; removed when done"), "400": err("bad query"), "401": err("no or wrong token"),
                                  "404": err("no such node"), "409": err("would leave too few nodes in service")}}
            },
            "/v1/nodes/{id}/drain": {
                "parameters": [id_param.clone()],
                "post": {"summary": "No new requests or carts; in-flight requests and bound carts finish until the deadline. Idempotent.",
                    "requestBody": {"required": false, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Drain"}, "example": {"timeout": "300s", "force": false}}}},
                    "responses": {"202": node("draining"), "400": err("bad body"), "401": err("no or wrong token"),
                                  "404": err("no such node"), "409": err("would leave too few nodes in service"), "413": err("body too large")}}
            },
            "/v1/nodes/{id}/undrain": {
                "parameters": [id_param.clone()],
                "post": {"summary": "End a drain (back in service) or a maintenance (back to warming).",
                    "responses": {"200": node("the node"), "401": err("no or wrong token"), "404": err("no such node")}}
            },
            "/v1/autoscaler": {"get": {"summary": "Desired and actual size, observations, recent decisions with their reasons.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no autoscaler configured")}}},
            "/v1/autoscaler/history": {"get": {"summary": "Desired, in service and ordered once a second over the last ten minutes, oldest first (the status page's chart).",
                "responses": {"200": {"description": "samples", "content": {"application/json": {"schema": history_schema()}}},
                    "401": err("no or wrong token"), "404": err("no autoscaler configured")}}},
            "/v1/autoscaler/pause": {"post": {"summary": "Hold the current size until resumed.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no autoscaler configured")}}},
            "/v1/waiting-room": {"get": {"summary": "The waiting room: held by hand or not, visitors waiting, let in per second, the longest wait.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no waiting room configured")}}},
            "/v1/waiting-room/open": {"post": {"summary": "Hold the door: every new visitor waits in line (a pre-queue before a sale) until closed.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no waiting room configured")}}},
            "/v1/waiting-room/close": {"post": {"summary": "Let the line in, first come first, as fast as the pool has room; new visitors then come straight in while there is room.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no waiting room configured")}}},
            "/v1/tls/reload": {"post": {"summary": "Reload every TLS listener's certificate files; a listener whose new files do not load keeps its old certificates.",
                "responses": {"200": {"description": "all reloaded", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no TLS listener configured"), "422": err("a certificate or key was refused; the old ones keep serving")}}},
            "/v1/config/reload": {"post": {"summary": "Re-read the config file; if it is valid, a new process takes the listening sockets over and serves it, and this one finishes its requests and exits (also SIGHUP). A broken file is refused and changes nothing.",
                "responses": {"200": {"description": "a new process serves the new config", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("not running under `surge serve`"), "422": err("the file does not validate (file, line, key and reason given), or the new process failed to start; the running config keeps serving")}}},
            "/v1/upgrade": {"post": {"summary": "Start the binary now at this one's path with the same arguments, hand it the listening sockets, and once it serves finish this process's requests and exit (also SIGUSR2).",
                "responses": {"200": {"description": "the new binary serves", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("not running under `surge serve`"), "422": err("the new process failed to start; this one keeps serving")}}},
            "/v1/cluster": {"get": {"summary": "In a cluster ([cluster]): who leads, this process's lease, every member and its latest published reading.",
                "responses": {"200": {"description": "the cluster as this process sees it", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("standalone: no [cluster] section")}}},
            "/v1/autoscaler/resume": {"post": {"summary": "Resume scaling.",
                "responses": {"200": {"description": "status", "content": {"application/json": {}}}, "401": err("no or wrong token"),
                              "404": err("no autoscaler configured")}}},
            "/v1/nodes/{id}/maint": {
                "parameters": [id_param],
                "post": {"summary": "Maintenance: no traffic, no health checks, until undrained.",
                    "responses": {"200": node("the node"), "401": err("no or wrong token"), "404": err("no such node")}}
            }
    })
}
