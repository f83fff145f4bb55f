//! A fake Kubernetes API server, faithful to the protocol for what the agent uses: list and
//! watch with resourceVersion, ADDED/MODIFIED/DELETED events, bookmarks, 410 Gone for a
//! compacted resourceVersion, label and field selectors, get, and Kubernetes `Status` errors.
//! It keeps everything in memory and never persists anything.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::selector::LabelSelector;

/// The resources served: (plural, group/version, kind, namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("services", "v1", "Service", true),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", true),
    ("pods", "v1", "Pod", true),
    ("nodes", "v1", "Node", false),
];

const HISTORY: usize = 10_000;

#[derive(Clone, Debug)]
struct StoredEvent {
    rv: u64,
    resource: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: VecDeque<StoredEvent>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    close_watches: broadcast::Sender<()>,
    bookmark_interval: Duration,
}

/// A running fake API server on loopback.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

fn resource_of_kind(kind: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().copied().find(|r| r.2 == kind)
}

fn resource_by_plural(plural: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().copied().find(|r| r.0 == plural)
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

impl FakeApiServer {
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("literal address"), Duration::from_secs(1)).await
    }

    pub async fn start_on(addr: SocketAddr, bookmark_interval: Duration) -> std::io::Result<Self> {
        let (events, _) = broadcast::channel(HISTORY);
        let (close_watches, _) = broadcast::channel(4);
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            events,
            close_watches,
            bookmark_interval,
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { shared, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing kube-rs at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\nusers:\n- name: sim\n  user: {{}}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\ncurrent-context: sim\n",
            self.url()
        )
    }

    /// Creates or replaces an object (by kind, namespace and name); returns its resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let (plural, api_version, _, namespaced) = resource_of_kind(&kind).expect("a kind the fake API serves");
        let ns = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let mut store = self.shared.store.lock().expect("store lock");
        store.rv += 1;
        let rv = store.rv;
        object["apiVersion"] = json!(api_version);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if namespaced {
            object["metadata"]["namespace"] = json!(ns);
        }
        let key = (plural, ns, name);
        let type_ = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if type_ == "ADDED" {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        store.objects.insert(key, object.clone());
        self.record(&mut store, type_, plural, object);
        rv
    }

    /// Deletes an object; returns the deletion's resourceVersion.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let (plural, _, _, namespaced) = resource_of_kind(kind)?;
        let ns = if namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        let mut store = self.shared.store.lock().expect("store lock");
        let mut object = store.objects.remove(&(plural, ns, name.to_string()))?;
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut store, "DELETED", plural, object);
        Some(rv)
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (plural, _, _, namespaced) = resource_of_kind(kind)?;
        let ns = if namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        self.shared
            .store
            .lock()
            .expect("store lock")
            .objects
            .get(&(plural, ns, name.to_string()))
            .cloned()
    }

    fn record(&self, store: &mut Store, type_: &str, resource: &'static str, object: Value) {
        let ev = StoredEvent {
            rv: store.rv,
            resource,
            object: json!({"type": type_, "object": object}),
        };
        store.history.push_back(ev.clone());
        while store.history.len() > HISTORY {
            if let Some(old) = store.history.pop_front() {
                store.oldest_watchable = old.rv;
            }
        }
        let _ = self.shared.events.send(Arc::new(ev));
    }

    /// Forgets the event history, as etcd compaction does: watches from an older
    /// resourceVersion now get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("store lock");
        store.history.clear();
        store.oldest_watchable = store.rv;
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    pub fn close_watches(&self) {
        let _ = self.shared.close_watches.send(());
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
    namespace: Option<String>,
    name: Option<String>,
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
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(name.to_string())),
        _ => return None,
    };
    let (plural, api_version, kind, _) = resource_by_plural(plural)?;
    let expected_prefix = if api_version == "v1" {
        "/api/v1/".to_string()
    } else {
        format!("/apis/{api_version}/")
    };
    path.starts_with(&expected_prefix).then_some(Request {
        plural,
        api_version,
        kind,
        namespace,
        name,
    })
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

async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    let Some(req) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource {}", uri.path()),
        );
    };
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} is not supported on {} by the fake API server", req.plural),
        );
    }
    let q = query_map(&uri);
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
    if let Some(name) = &req.name {
        let store = shared.store.lock().expect("store lock");
        let ns = req.namespace.clone().unwrap_or_default();
        return match store.objects.get(&(req.plural, ns, name.clone())) {
            Some(o) => (StatusCode::OK, [("content-type", "application/json")], o.to_string()).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", req.plural),
            ),
        };
    }
    let filter = Filter {
        namespace: req.namespace.clone(),
        name: None,
        labels,
        fields,
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(shared, req, filter, &q);
    }
    let store = shared.store.lock().expect("store lock");
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((p, _, _), _)| *p == req.plural)
        .map(|(_, o)| o)
        .filter(|o| filter.matches(o))
        .collect();
    let body = json!({"kind": format!("{}List", req.kind), "apiVersion": req.api_version,
        "metadata": {"resourceVersion": store.rv.to_string()}, "items": items});
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

fn watch(shared: Arc<Shared>, req: Request, filter: Filter, q: &BTreeMap<String, String>) -> Response {
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
    let interval = shared.bookmark_interval;
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
            if filter.matches(&ev.object["object"]) && tx.send(line(&ev.object)).await.is_err() {
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
                        if filter.matches(&ev.object["object"]) && tx.send(line(&ev.object)).await.is_err() {
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
