//! The simulated cluster: a fake Kubernetes API server that kube-rs talks to unmodified over
//! real HTTP, kube-proxy rule emulators in network namespaces, and the agents in-process.
//! Used by `kube-converge-sim` (the README's quick start), the system tests and the benchmark
//! harnesses. None of it is compiled into the agent.

pub mod apiserver;
pub mod controller;
pub mod desired;
pub mod emulate;
pub mod node;
pub mod patch;
pub mod scenario;
pub mod store;
