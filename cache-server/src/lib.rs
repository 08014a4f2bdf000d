//! Granary's cache worker.
//!
//! A worker serves one namespace (mount points over S3-compatible stores and POSIX directories)
//! from a hybrid memory + disk block cache. [`Worker`] implements the [`granary_proto::CacheApi`];
//! [`grpc::serve`] exposes it to remote clients.

pub mod backend;
pub mod blocks;
pub mod config;
pub mod dataset_api;
pub mod dataset_grpc;
pub mod datasets;
pub mod grpc;
pub mod listing;
pub mod registry;
mod rpc_metrics;
pub mod tenant_view;
pub mod worker;

pub use config::{ConfigFile, Settings};
pub use worker::{StartError, Worker};
