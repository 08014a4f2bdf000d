//! Granary's scheduler hook: a kube-scheduler extender (v1, HTTP + JSON) that places gangs of
//! training pods all-or-nothing, near their data, and lets them bind only when GPUs and data are
//! both ready (docs/SCHEDULING.md).
//!
//! - [`extender`]: the wire types of `k8s.io/kube-scheduler/extender/v1`;
//! - [`pod`]: what pods ask (annotations, labels, GPU requests);
//! - [`hook`]: the state and the decisions (pure, driven with `now`; planning itself is
//!   `granary_core::gang`);
//! - [`data`]: the cache cluster as a [`data::DataSource`] (readiness per node, loads);
//! - [`driver`]: the running [`driver::Hook`] and its loop;
//! - [`http`]: the HTTP routes; [`tls`]: serving them over mutual TLS;
//! - [`kube`]: the Kubernetes side (watches of Nodes, Pods and PodGroups; Bindings, Events).

pub mod data;
pub mod driver;
pub mod error;
pub mod extender;
pub mod hook;
pub mod http;
pub mod kube;
pub mod pod;
pub mod tls;

pub use driver::{ClusterApi, Hook};
pub use error::CallError;
pub use hook::{HookConfig, HookState};
