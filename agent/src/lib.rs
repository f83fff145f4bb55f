//! kube-converge: measures, per node, how long kube-proxy takes to program endpoint changes
//! into the kernel, and exports the lag.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod crd;
pub mod dataplane;
pub mod emulate;
pub mod expected;
#[doc(hidden)]
pub mod fuzzing;
pub mod hold;
pub mod inspect;
pub mod isolate;
pub mod k8s;
pub mod model;
pub mod netns;
pub mod publish;
pub mod resolve;
pub mod selector;
pub mod sim;
pub mod table;
pub mod telemetry;
pub mod tracker;
