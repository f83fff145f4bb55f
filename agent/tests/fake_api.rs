//! The fake API server must behave as kube-rs expects of a real one: these tests drive it with
//! kube's own `Api` and kube-runtime's `watcher`.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use kc_sim::apiserver::FakeApiServer;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;

async fn client(api: &FakeApiServer) -> Client {
    let kc = kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
    Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

fn svc(name: &str, app: &str) -> serde_json::Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns1", "labels": {"app": app}},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})
}

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": "ns1", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.9"}})
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin),
) -> watcher::Event<Service> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
}

fn describe(ev: &watcher::Event<Service>) -> String {
    let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
    match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(s) => format!("InitApply({})", name(s)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(s) => format!("Apply({})", name(s)),
        watcher::Event::Delete(s) => format!("Delete({})", name(s)),
    }
}

#[tokio::test]
async fn kube_runtime_watcher_sees_list_then_events_and_relists_after_410() {
    let api = FakeApiServer::start().await.unwrap();
    api.apply(svc("a", "web"));
    api.apply(svc("b", "web"));
    api.apply(svc("other", "db"));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns1");
    let mut stream = watcher(services, watcher::Config::default().labels("app=web")).boxed();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(describe(&next_event(&mut stream).await));
    }
    assert_eq!(got, ["Init", "InitApply(a)", "InitApply(b)", "InitDone"]);
    api.apply(svc("c", "web"));
    assert_eq!(describe(&next_event(&mut stream).await), "Apply(c)");
    api.apply(svc("d", "db"));
    api.delete("Service", "ns1", "a");
    assert_eq!(
        describe(&next_event(&mut stream).await),
        "Delete(a)",
        "the label selector hides d"
    );
    // Cut the watch after history moved on and was compacted: resuming gets 410 Gone.
    api.apply(svc("e", "db"));
    api.compact();
    api.close_watches();
    // kube-runtime reports the 410 once, then relists.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap();
    match first {
        Err(watcher::Error::WatchError(e)) => assert_eq!(e.code, 410),
        other => panic!("expected the 410 Gone to surface, got {other:?}"),
    }
    let mut got = Vec::new();
    loop {
        let ev = describe(&next_event(&mut stream).await);
        let done = ev == "InitDone";
        got.push(ev);
        if done {
            break;
        }
    }
    assert_eq!(
        got,
        ["Init", "InitApply(b)", "InitApply(c)", "InitDone"],
        "a relist with the current objects"
    );
}

#[tokio::test]
async fn raw_watch_gives_bookmarks_and_410_as_an_error_event() {
    let api = FakeApiServer::start().await.unwrap();
    api.apply(svc("a", "web"));
    let services: Api<Service> = Api::namespaced(client(&api).await, "ns1");
    let rv = services
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut s = services
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            }
            .timeout(10),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), s.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Bookmark(_)), "expected a bookmark, got {ev:?}");
    api.apply(svc("b", "web"));
    api.compact();
    let mut old = services.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn selectors_get_patch_status_delete_and_errors() {
    let api = FakeApiServer::start().await.unwrap();
    let c = client(&api).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "ns1");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod("p1", "node-a")).unwrap(),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod("p2", "node-b")).unwrap(),
    )
    .await
    .unwrap();
    let dup = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("p1", "node-a")).unwrap(),
        )
        .await;
    assert!(matches!(dup, Err(kube::Error::Api(e)) if e.code == 409 && e.reason == "AlreadyExists"));
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(on_a.items.len(), 1);
    assert!(
        pods.list(&ListParams::default().fields("spec.bogus=1")).await.is_err(),
        "unsupported field selector"
    );
    // Merge, strategic and JSON patches of labels.
    let merge = json!({"metadata": {"labels": {"app": "web-offline"}}});
    let p = pods
        .patch("p1", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    assert_eq!(p.metadata.labels.unwrap()["app"], "web-offline");
    let strategic = json!({"metadata": {"labels": {"tier": "x"}}});
    pods.patch("p1", &PatchParams::default(), &Patch::Strategic(&strategic))
        .await
        .unwrap();
    let ops: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/metadata/labels/app", "value": "web"}])).unwrap();
    let p = pods
        .patch("p1", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    let labels = p.metadata.labels.unwrap();
    assert_eq!((labels["app"].as_str(), labels["tier"].as_str()), ("web", "x"));
    // The status subresource changes status only; the main resource leaves status alone.
    let st = json!({"status": {"phase": "Failed"}, "metadata": {"labels": {"ignored": "yes"}}});
    let p = pods
        .patch_status("p1", &PatchParams::default(), &Patch::Merge(&st))
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Failed"));
    assert!(!p.metadata.labels.unwrap().contains_key("ignored"));
    // A stale resourceVersion conflicts.
    let mut stale = pods.get("p2").await.unwrap();
    pods.patch("p2", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .unwrap();
    stale
        .metadata
        .labels
        .get_or_insert_default()
        .insert("x".into(), "y".into());
    let r = pods.replace("p2", &PostParams::default(), &stale).await;
    assert!(matches!(r, Err(kube::Error::Api(e)) if e.code == 409));
    // Delete with a grace period: terminating first, gone after it.
    pods.delete("p2", &DeleteParams::default().grace_period(1))
        .await
        .unwrap();
    assert!(pods.get("p2").await.unwrap().metadata.deletion_timestamp.is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(pods.get("p2").await, Err(kube::Error::Api(e)) if e.code == 404 && e.reason == "NotFound"));
    // Unsupported calls get Status errors.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c, "ns1");
    assert!(matches!(secrets.list(&ListParams::default()).await, Err(kube::Error::Api(e)) if e.code == 404));
}
