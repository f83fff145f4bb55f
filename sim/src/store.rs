//! The simulated cluster's object store: objects with resourceVersions, an event history for
//! watches (compactable, so old versions get 410 Gone), pod deletion with a grace period, and
//! the EndpointSlice controller run after every Pod or Service change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::controller;
use super::patch;
use kube_converge::model::Timestamp;

/// (plural, group/version, kind, namespaced, has a status subresource)
pub type ResourceInfo = (&'static str, &'static str, &'static str, bool, bool);

pub const RESOURCES: &[ResourceInfo] = &[
    ("services", "v1", "Service", true, true),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", true, false),
    ("pods", "v1", "Pod", true, true),
    ("nodes", "v1", "Node", false, true),
    (
        "nodeconvergences",
        "converge.kube-converge.io/v1alpha1",
        "NodeConvergence",
        false,
        true,
    ),
    // Workloads, for `advise` (stored as given: no controller runs them).
    ("deployments", "apps/v1", "Deployment", true, true),
    ("statefulsets", "apps/v1", "StatefulSet", true, true),
    ("daemonsets", "apps/v1", "DaemonSet", true, true),
];

pub fn resource_of_kind(kind: &str) -> Option<ResourceInfo> {
    RESOURCES.iter().copied().find(|r| r.2 == kind)
}

pub fn resource_by_plural(plural: &str) -> Option<ResourceInfo> {
    RESOURCES.iter().copied().find(|r| r.0 == plural)
}

const HISTORY: usize = 10_000;

#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub resource: &'static str,
    /// `{"type": ..., "object": ...}` as a watch sends it.
    pub event: Value,
}

#[derive(Default)]
pub(super) struct Store {
    pub rv: u64,
    pub objects: BTreeMap<(&'static str, String, String), Value>,
    pub history: VecDeque<StoredEvent>,
    /// Watches from a resourceVersion below this get 410 Gone.
    pub oldest_watchable: u64,
}

pub(super) struct Shared {
    pub store: Mutex<Store>,
    pub events: broadcast::Sender<Arc<StoredEvent>>,
    pub close_watches: broadcast::Sender<()>,
    /// Serialises controller passes.
    reconcile: Mutex<()>,
}

/// Why a write was refused, as an API `Status` reason and HTTP code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    pub fn code_and_reason(&self) -> (u16, &'static str) {
        match self {
            StoreError::NotFound(_) => (404, "NotFound"),
            StoreError::AlreadyExists(_) => (409, "AlreadyExists"),
            StoreError::Conflict(_) => (409, "Conflict"),
            StoreError::Invalid(_) => (422, "Invalid"),
        }
    }
}

/// What part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Everything but `.status` (for resources with a status subresource).
    Main,
    Status,
}

/// A handle on the simulated cluster's state; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(super) shared: Arc<Shared>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

fn key_of(info: ResourceInfo, namespace: &str, name: &str) -> (&'static str, String, String) {
    (
        info.0,
        if info.3 { namespace.to_string() } else { String::new() },
        name.to_string(),
    )
}

impl Cluster {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(HISTORY);
        let (close_watches, _) = broadcast::channel(4);
        Self {
            shared: Arc::new(Shared {
                store: Mutex::default(),
                events,
                close_watches,
                reconcile: Mutex::new(()),
            }),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().expect("store lock").rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.shared.events.subscribe()
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let info = resource_of_kind(kind)?;
        self.shared
            .store
            .lock()
            .expect("store lock")
            .objects
            .get(&key_of(info, namespace, name))
            .cloned()
    }

    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Some(info) = resource_of_kind(kind) else {
            return vec![];
        };
        let store = self.shared.store.lock().expect("store lock");
        store
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == info.0)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Creates or replaces an object as given (test and simulation setup; no conflict check).
    pub fn apply(&self, object: Value) -> u64 {
        let rv = self.write(object, None, true).expect("apply of a served kind");
        self.after_write_of(rv);
        rv
    }

    /// Creates an object; AlreadyExists if it does.
    pub fn create(&self, object: Value) -> Result<Value, StoreError> {
        let out = self.write(object, Some(false), true)?;
        self.after_write_of(out);
        self.get_rv(out)
    }

    /// Replaces an object (PUT); Conflict on a stale resourceVersion.
    pub fn replace(&self, object: Value, part: Part) -> Result<Value, StoreError> {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let (ns, name) = ns_name(&object);
        let mut current = self.get(&kind, &ns, &name).ok_or_else(|| not_found(&kind, &name))?;
        check_version(&object, &current)?;
        apply_part(&mut current, &object, part);
        let rv = self.write(current, Some(true), true)?;
        self.after_write_of(rv);
        self.get_rv(rv)
    }

    /// Patches an object: `merge` (merge and strategic patches) or `json` (RFC 6902).
    pub fn patch(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        json_patch: bool,
        body: &Value,
        part: Part,
    ) -> Result<Value, StoreError> {
        let current = self.get(kind, namespace, name).ok_or_else(|| not_found(kind, name))?;
        let mut next = current.clone();
        if json_patch {
            patch::json_patch(&mut next, body).map_err(StoreError::Invalid)?;
        } else {
            if body.get("metadata").and_then(|m| m.get("resourceVersion")).is_some() {
                check_version(body, &current)?;
            }
            patch::merge(&mut next, body);
        }
        let mut merged = current.clone();
        apply_part(&mut merged, &next, part);
        if merged == current {
            return Ok(current); // a no-op patch writes nothing, as the API server does
        }
        let rv = self.write(merged, Some(true), false)?;
        self.after_write_of(rv);
        self.get_rv(rv)
    }

    /// Deletes an object. A pod with a grace period is marked (deletionTimestamp) and removed
    /// after it; everything else goes at once.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str, grace: Option<u64>) -> Result<Value, StoreError> {
        let info = resource_of_kind(kind).ok_or_else(|| not_found(kind, name))?;
        let current = self.get(kind, namespace, name).ok_or_else(|| not_found(kind, name))?;
        let grace = if kind == "Pod" {
            grace
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_u64())
                .unwrap_or(30)
        } else {
            0
        };
        if grace > 0 {
            if current["metadata"]["deletionTimestamp"].is_string() {
                return Ok(current);
            }
            let mut marked = current;
            let now = Timestamp::now();
            marked["metadata"]["deletionTimestamp"] = json!(now.plus(Duration::from_secs(grace)).to_rfc3339());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            let rv = self.write(marked, Some(true), false)?;
            self.after_write_of(rv);
            let me = self.clone();
            let (ns, n) = (namespace.to_string(), name.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(grace)).await;
                let _ = me.delete_now(info, &ns, &n);
            });
            return self.get_rv(rv);
        }
        self.delete_now(info, namespace, name)
    }

    fn delete_now(&self, info: ResourceInfo, namespace: &str, name: &str) -> Result<Value, StoreError> {
        let mut store = self.shared.store.lock().expect("store lock");
        let mut object = store
            .objects
            .remove(&key_of(info, namespace, name))
            .ok_or_else(|| not_found(info.2, name))?;
        store.rv += 1;
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let rv = store.rv;
        self.record(&mut store, "DELETED", info.0, object.clone());
        drop(store);
        if info.2 == "Pod" || info.2 == "Service" {
            self.reconcile(namespace);
        }
        let _ = rv;
        Ok(object)
    }

    fn get_rv(&self, rv: u64) -> Result<Value, StoreError> {
        let store = self.shared.store.lock().expect("store lock");
        store
            .history
            .iter()
            .rev()
            .find(|e| e.rv == rv)
            .map(|e| e.event["object"].clone())
            .ok_or_else(|| StoreError::NotFound(format!("resourceVersion {rv}")))
    }

    /// Stores `object`. `must_exist`: Some(true) replace only, Some(false) create only.
    fn write(&self, mut object: Value, must_exist: Option<bool>, fresh_meta: bool) -> Result<u64, StoreError> {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let info =
            resource_of_kind(&kind).ok_or_else(|| StoreError::Invalid(format!("kind {kind:?} is not served")))?;
        let (ns, name) = ns_name(&object);
        if name.is_empty() {
            return Err(StoreError::Invalid("metadata.name is required".into()));
        }
        let ns = if info.3 {
            if ns.is_empty() {
                "default".to_string()
            } else {
                ns
            }
        } else {
            String::new()
        };
        let mut store = self.shared.store.lock().expect("store lock");
        let key = key_of(info, &ns, &name);
        let exists = store.objects.get(&key).cloned();
        match (must_exist, &exists) {
            (Some(true), None) => return Err(not_found(&kind, &name)),
            (Some(false), Some(_)) => {
                return Err(StoreError::AlreadyExists(format!(
                    "{} \"{name}\" already exists",
                    info.0
                )))
            }
            _ => {}
        }
        store.rv += 1;
        let rv = store.rv;
        object["apiVersion"] = json!(info.1);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if info.3 {
            object["metadata"]["namespace"] = json!(ns);
        }
        match &exists {
            Some(old) => {
                object["metadata"]["uid"] = old["metadata"]["uid"].clone();
                object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
            None => {
                object["metadata"]["uid"] = json!(format!("uid-{rv}"));
                object["metadata"]["creationTimestamp"] = json!(Timestamp::now().to_rfc3339()[..19].to_string() + "Z");
            }
        }
        let _ = fresh_meta;
        store.objects.insert(key, object.clone());
        let type_ = if exists.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut store, type_, info.0, object);
        Ok(rv)
    }

    fn after_write_of(&self, rv: u64) {
        let Ok(obj) = self.get_rv(rv) else { return };
        let kind = obj["kind"].as_str().unwrap_or_default();
        if kind == "Pod" || kind == "Service" {
            self.reconcile(obj["metadata"]["namespace"].as_str().unwrap_or("default"));
        }
    }

    /// The EndpointSlice controller pass for one namespace.
    fn reconcile(&self, namespace: &str) {
        let _serial = self.shared.reconcile.lock().expect("reconcile lock");
        let (services, pods, slices): (Vec<Value>, Vec<Value>, Vec<Value>) = {
            let store = self.shared.store.lock().expect("store lock");
            let in_ns = |plural: &str| -> Vec<Value> {
                store
                    .objects
                    .iter()
                    .filter(|((p, ns, _), _)| *p == plural && ns == namespace)
                    .map(|(_, o)| o.clone())
                    .collect()
            };
            (in_ns("services"), in_ns("pods"), in_ns("endpointslices"))
        };
        let now = Timestamp::now();
        for change in controller::reconcile(&services, &pods, &slices, now) {
            match change {
                controller::SliceChange::Upsert(slice) => {
                    let _ = self.write(slice, None, false);
                }
                controller::SliceChange::Delete(name) => {
                    if let Some(info) = resource_of_kind("EndpointSlice") {
                        let _ = self.delete_now(info, namespace, &name);
                    }
                }
            }
        }
    }

    fn record(&self, store: &mut Store, type_: &str, resource: &'static str, object: Value) {
        let ev = StoredEvent {
            rv: store.rv,
            resource,
            event: json!({"type": type_, "object": object}),
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

fn ns_name(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn not_found(kind: &str, name: &str) -> StoreError {
    StoreError::NotFound(format!("{} \"{name}\" not found", kind.to_lowercase()))
}

fn check_version(update: &Value, current: &Value) -> Result<(), StoreError> {
    match update["metadata"]["resourceVersion"].as_str() {
        Some(v) if Some(v) != current["metadata"]["resourceVersion"].as_str() => Err(StoreError::Conflict(
            "the object has been modified; please apply your changes to the latest version and try again".into(),
        )),
        _ => Ok(()),
    }
}

/// Takes the writable part of `update` into `current`.
fn apply_part(current: &mut Value, update: &Value, part: Part) {
    match part {
        Part::Status => current["status"] = update["status"].clone(),
        Part::Main => {
            let status = current["status"].clone();
            *current = update.clone();
            if !status.is_null() {
                current["status"] = status;
            } else if let Some(m) = current.as_object_mut() {
                m.remove("status");
            }
        }
    }
}
