//! kube-converge: measures, per node, how long kube-proxy takes to program endpoint changes
//! into the kernel, and exports the lag.

// Unsafe code stays in the FFI and syscall items that allow it, each with its reason.
#![deny(unsafe_code)]

pub mod admin;
pub mod advise;
pub mod agent;
pub mod cli;
pub mod config;
pub mod crd;
pub mod dataplane;
pub mod expected;
#[doc(hidden)]
pub mod fuzzing;
pub mod hold;
pub mod inspect;
pub mod isolate;
pub mod k8s;
pub mod kube_proxy_names;
pub mod model;
pub mod netns;
pub mod publish;
pub mod resolve;
pub mod selector;
pub mod switch;
pub mod table;
pub mod telemetry;
pub mod tracker;
pub mod traffic;
