//! The simulated cluster: a fake Kubernetes API server that kube-rs talks to unmodified over
//! real HTTP. Used by the system tests and (later) by `kube-converge sim`.

pub mod apiserver;
pub mod controller;
pub mod node;
pub mod patch;
pub mod scenario;
pub mod store;
