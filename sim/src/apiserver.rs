//! A fake Kubernetes API server over the simulated cluster's store, faithful to the protocol
//! for what the agent and the CLI use: list and watch with resourceVersion, ADDED/MODIFIED/
//! DELETED events, bookmarks, 410 Gone for a compacted resourceVersion, label and field
//! selectors, get, create, replace, merge/strategic/JSON patch, delete with a grace period,
//! the status subresource, and Kubernetes `Status` errors for everything else.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde_json::{json, Value};

use super::store::{resource_by_plural, Cluster, Part, StoreError, StoredEvent, RESOURCES};
use kube_converge::selector::LabelSelector;

/// One kind of request a client made: (user, verb, API group, resource[/subresource]), the
/// user being the bearer token. Used to check RBAC rules against what the code really calls.
pub type RequestKind = (String, String, String, String);

#[derive(Clone)]
struct ServerState {
    cluster: Cluster,
    bookmark_interval: Duration,
    requests: Requests,
}

/// A running fake API server on loopback.
pub struct FakeApiServer {
    cluster: Cluster,
    addr: SocketAddr,
    bookmark_interval: Duration,
    requests: Requests,
    task: tokio::task::JoinHandle<()>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

fn store_error(e: StoreError) -> Response {
    let (code, reason) = e.code_and_reason();
    status(
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        reason,
        &e.to_string(),
    )
}

fn ok_json(v: &Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response()
}

/// How many requests of each kind each user made.
type Requests = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<RequestKind, u64>>>;

async fn serve(
    cluster: Cluster,
    addr: SocketAddr,
    bookmark_interval: Duration,
    requests: Requests,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(handle).with_state(ServerState {
        cluster,
        bookmark_interval,
        requests,
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

impl FakeApiServer {
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(
            Cluster::new(),
            "127.0.0.1:0".parse().expect("literal address"),
            Duration::from_secs(1),
        )
        .await
    }

    pub async fn start_with(cluster: Cluster, addr: SocketAddr, bookmark_interval: Duration) -> std::io::Result<Self> {
        let requests = Requests::default();
        let (addr, task) = serve(cluster.clone(), addr, bookmark_interval, requests.clone()).await?;
        Ok(Self {
            cluster,
            addr,
            bookmark_interval,
            requests,
            task,
        })
    }

    /// The kinds of request each user made so far.
    pub fn requests(&self) -> std::collections::BTreeSet<RequestKind> {
        self.requests
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many requests of each kind each user made so far.
    pub fn request_counts(&self) -> std::collections::BTreeMap<RequestKind, u64> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops serving and cuts every watch, as an API server going down does. The objects stay.
    pub fn stop(&mut self) {
        self.task.abort();
        self.cluster.close_watches();
    }

    /// Serves again on the same address after `stop`.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        let mut last = None;
        for _ in 0..50 {
            match serve(
                self.cluster.clone(),
                self.addr,
                self.bookmark_interval,
                std::sync::Arc::clone(&self.requests),
            )
            .await
            {
                Ok((_, task)) => {
                    self.task = task;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("could not rebind")))
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing kube-rs at this server.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for("anonymous")
    }

    /// A kubeconfig whose bearer token names `user` in `requests()`.
    pub fn kubeconfig_for(&self, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\nusers:\n- name: sim\n  user:\n    token: {user}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\ncurrent-context: sim\n",
            self.url()
        )
    }

    /// Creates or replaces an object; returns its resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        self.cluster.apply(object)
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let deleted = self.cluster.delete(kind, namespace, name, Some(0)).ok()?;
        deleted["metadata"]["resourceVersion"].as_str()?.parse().ok()
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.cluster.get(kind, namespace, name)
    }

    pub fn compact(&self) {
        self.cluster.compact();
    }

    pub fn close_watches(&self) {
        self.cluster.close_watches();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Request {
    plural: &'static str,
    api_version: &'static str,
    kind: &'static str,
    namespaced: bool,
    has_status: bool,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Request> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    let (plural, api_version, kind, namespaced, has_status) = resource_by_plural(plural)?;
    let expected_prefix = if api_version == "v1" {
        "/api/v1/".to_string()
    } else {
        format!("/apis/{api_version}/")
    };
    path.starts_with(&expected_prefix).then_some(Request {
        plural,
        api_version,
        kind,
        namespaced,
        has_status,
        namespace,
        name,
        subresource,
    })
}

/// Legacy (unaggregated) discovery for the fake's resources, as kubectl and kube-rs ask for it:
/// `/api`, `/apis`, `/api/v1` and `/apis/GROUP/VERSION`. Clients that prefer aggregated
/// discovery fall back to it, since the answer is plain `application/json`.
fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let versions: Vec<&str> = {
        let mut v: Vec<&str> = RESOURCES.iter().map(|r| r.1).filter(|gv| *gv != "v1").collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let resources = |gv: &str| -> Value {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.1 == gv)
            .flat_map(|&(plural, _, kind, namespaced, has_status)| {
                let main = json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                    "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]});
                let status = json!({"name": format!("{plural}/status"), "singularName": "", "namespaced": namespaced,
                    "kind": kind, "verbs": ["get", "patch", "update"]});
                std::iter::once(main).chain(has_status.then_some(status))
            })
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    match path {
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        "/api/v1" => Some(resources("v1")),
        "/apis" => {
            let groups: Vec<Value> = versions
                .iter()
                .filter_map(|gv| gv.split_once('/'))
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let gv = p.strip_prefix("/apis/")?;
            versions.contains(&gv).then(|| resources(gv))
        }
    }
}

fn query_map(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed `fieldSelector`: `path=value`, `path==value` or `path!=value` terms.
fn field_matches(selector: &str, object: &Value) -> Result<bool, String> {
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (path, want, negate) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (p, v, false)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        if !["metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"].contains(&path) {
            return Err(format!("field label not supported: {path}"));
        }
        let got = path.split('.').fold(object, |v, k| &v[k]).as_str().unwrap_or("");
        if (got == want) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

struct Filter {
    namespace: Option<String>,
    name: Option<String>,
    labels: LabelSelector,
    fields: String,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| meta["namespace"].as_str() != Some(ns))
        {
            return false;
        }
        if self.name.as_deref().is_some_and(|n| meta["name"].as_str() != Some(n)) {
            return false;
        }
        let labels: BTreeMap<String, String> = meta["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        self.labels.matches(&labels) && field_matches(&self.fields, object).unwrap_or(false)
    }
}

async fn handle(
    State(state): State<ServerState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET {
        if let Some(doc) = discovery(uri.path()) {
            return ok_json(&doc);
        }
    }
    let Some(req) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource {}", uri.path()),
        );
    };
    let part = match req.subresource.as_deref() {
        None => Part::Main,
        Some("status") if req.has_status => Part::Status,
        Some(other) => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} has no subresource {other:?} in the fake API server", req.plural),
            )
        }
    };
    let q = query_map(&uri);
    let verb = match (&method, req.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    };
    let user = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("anonymous")
        .to_string();
    let group = req.api_version.rsplit_once('/').map_or("", |(g, _)| g).to_string();
    let resource = match &req.subresource {
        Some(sub) => format!("{}/{sub}", req.plural),
        None => req.plural.to_string(),
    };
    if let Ok(mut r) = state.requests.lock() {
        *r.entry((user, verb.to_string(), group, resource)).or_default() += 1;
    }
    let ns = req.namespace.clone().unwrap_or_default();
    if req.namespaced && req.name.is_some() && req.namespace.is_none() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} are namespaced: use /namespaces/NS/{}", req.plural, req.plural),
        );
    }
    let parse_body = || serde_json::from_slice::<Value>(&body);
    match (method.clone(), req.name.clone()) {
        (Method::GET, Some(name)) => match state.cluster.get(req.kind, &ns, &name) {
            Some(o) => ok_json(&o),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", req.plural),
            ),
        },
        (Method::GET, None) => list_or_watch(&state, &req, &q),
        (Method::POST, None) => {
            let mut obj = match parse_body() {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid JSON body: {e}"),
                    )
                }
            };
            obj["kind"] = json!(req.kind);
            if req.namespaced {
                obj["metadata"]["namespace"] = json!(ns);
            }
            match state.cluster.create(obj) {
                Ok(o) => (
                    StatusCode::CREATED,
                    [("content-type", "application/json")],
                    o.to_string(),
                )
                    .into_response(),
                Err(e) => store_error(e),
            }
        }
        (Method::PUT, Some(name)) => {
            let mut obj = match parse_body() {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid JSON body: {e}"),
                    )
                }
            };
            if obj["metadata"]["name"].as_str() != Some(name.as_str()) {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name in the body does not match the URL",
                );
            }
            obj["kind"] = json!(req.kind);
            if req.namespaced {
                obj["metadata"]["namespace"] = json!(ns);
            }
            match state.cluster.replace(obj, part) {
                Ok(o) => ok_json(&o),
                Err(e) => store_error(e),
            }
        }
        (Method::PATCH, Some(name)) => {
            let ctype = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let json_patch = match ctype.split(';').next().unwrap_or_default().trim() {
                "application/json-patch+json" => true,
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
                "application/apply-patch+yaml" => {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "server-side apply is not supported by the fake API server",
                    )
                }
                other => {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        &format!("the body of the request was in an unknown format: {other}"),
                    )
                }
            };
            let patch = match parse_body() {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid JSON body: {e}"),
                    )
                }
            };
            match state.cluster.patch(req.kind, &ns, &name, json_patch, &patch, part) {
                Ok(o) => ok_json(&o),
                Err(e) => store_error(e),
            }
        }
        (Method::DELETE, Some(name)) => {
            let body_grace = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["gracePeriodSeconds"].as_u64());
            let grace = q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()).or(body_grace);
            match state.cluster.delete(req.kind, &ns, &name, grace) {
                Ok(o) => ok_json(&o),
                Err(e) => store_error(e),
            }
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{m} is not supported on {} by the fake API server", req.plural),
        ),
    }
}

fn list_or_watch(state: &ServerState, req: &Request, q: &BTreeMap<String, String>) -> Response {
    let labels = match LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
        Ok(l) => l,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unable to parse requirement: {e}"),
            )
        }
    };
    let fields = q.get("fieldSelector").cloned().unwrap_or_default();
    if let Err(e) = field_matches(&fields, &json!({})) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", &e);
    }
    let filter = Filter {
        namespace: req.namespace.clone(),
        name: None,
        labels,
        fields,
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(state, req, filter, q);
    }
    let store = state.cluster.shared.store.lock().expect("store lock");
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((p, _, _), _)| *p == req.plural)
        .map(|(_, o)| o)
        .filter(|o| filter.matches(o))
        .collect();
    let body = json!({"kind": format!("{}List", req.kind), "apiVersion": req.api_version,
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items});
    ok_json(&body)
}

fn watch(state: &ServerState, req: &Request, filter: Filter, q: &BTreeMap<String, String>) -> Response {
    let shared = state.cluster.shared.clone();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(256);
    // Subscribe under the store lock so no event falls between the backlog and the live feed.
    let (backlog, mut live, mut closed, start_rv) = {
        let store = shared.store.lock().expect("store lock");
        let from: u64 = match q.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => store.rv,
            Some(v) => match v.parse() {
                Ok(v) => v,
                Err(_) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resourceVersion {v:?}"),
                    )
                }
            },
        };
        let gone = from < store.oldest_watchable;
        let backlog: Vec<StoredEvent> = if gone {
            vec![]
        } else {
            store
                .history
                .iter()
                .filter(|e| e.rv > from && e.resource == req.plural)
                .cloned()
                .collect()
        };
        let start = if gone { None } else { Some(from) };
        (
            backlog,
            shared.events.subscribe(),
            shared.close_watches.subscribe(),
            start,
        )
    };
    let (plural, kind, api_version) = (req.plural, req.kind, req.api_version);
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let mut tx = tx;
        let line = |v: &Value| Ok(Bytes::from(format!("{v}\n")));
        let Some(mut last_rv) = start_rv else {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
            let _ = tx.send(line(&gone)).await;
            return;
        };
        for ev in backlog {
            last_rv = ev.rv;
            if filter.matches(&ev.event["object"]) && tx.send(line(&ev.event)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = closed.recv() => return,
                ev = live.recv() => match ev {
                    Ok(ev) if ev.rv > last_rv && ev.resource == plural => {
                        last_rv = ev.rv;
                        if filter.matches(&ev.event["object"]) && tx.send(line(&ev.event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Too slow a reader: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last_rv.to_string()}}});
                    if tx.send(line(&bm)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(rx))
        .unwrap_or_else(|_| {
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "building the watch response",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_discovery_lists_every_served_resource() {
        assert_eq!(discovery("/api").unwrap()["versions"], json!(["v1"]));
        let groups = discovery("/apis").unwrap();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["apps", "converge.kube-converge.io", "discovery.k8s.io"]);
        let core = discovery("/api/v1/").unwrap();
        let core: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            core,
            [
                "services",
                "services/status",
                "pods",
                "pods/status",
                "nodes",
                "nodes/status"
            ]
        );
        let nc = discovery("/apis/converge.kube-converge.io/v1alpha1").unwrap();
        assert_eq!(nc["resources"][0]["name"], "nodeconvergences");
        assert_eq!(nc["resources"][0]["namespaced"], false);
        let apps = discovery("/apis/apps/v1").unwrap();
        assert_eq!(apps["resources"][0]["name"], "deployments");
        assert_eq!(apps["resources"][0]["namespaced"], true);
        assert!(discovery("/apis/batch/v1").is_none());
        assert!(discovery("/api/v1/namespaces/ns1/pods").is_none());
    }

    #[test]
    fn paths_map_to_resources() {
        let r = parse_path("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices").unwrap();
        assert_eq!(
            (r.plural, r.namespace.as_deref(), r.name),
            ("endpointslices", Some("ns1"), None)
        );
        let r = parse_path("/api/v1/namespaces/ns1/services/svc1").unwrap();
        assert_eq!((r.plural, r.name.as_deref()), ("services", Some("svc1")));
        assert!(parse_path("/api/v1/endpointslices").is_none(), "wrong group");
        assert!(parse_path("/api/v1/secrets").is_none());
        assert_eq!(decode("a%3Db%2C%21c"), "a=b,!c");
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}});
        assert_eq!(field_matches("spec.nodeName=n1", &pod), Ok(true));
        assert_eq!(field_matches("spec.nodeName!=n1", &pod), Ok(false));
        assert!(field_matches("spec.bogus=1", &pod).is_err());
    }
}
