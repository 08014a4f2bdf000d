//! Node certificates through the Kubernetes CSR API (`certificates.k8s.io/v1`), so that no node
//! holds the cluster CA's private key.
//!
//! - [`signer`]: the one component with the CA key (`granary signer`, deployed beside the
//!   scheduler hook). It approves and signs a request only when the apiserver shows it came from
//!   the worker service account, with a token bound to a pod, for the node that pod runs on
//!   ([`policy`]); it denies anything else with a reason. It publishes the CA certificate in a
//!   ConfigMap.
//! - [`request`]: the node side (`granary certs --csr`): a local key, a request, a bounded wait,
//!   the files written atomically, and renewal before expiry.
//! - [`ca`]: the CA and the certificates it issues (bounded lifetime, never CA:true).

pub mod ca;
pub mod policy;
pub mod request;
pub mod signer;
