//! What went wrong when the hook called the outside: the cache cluster's Datasets API or the
//! Kubernetes API. The hook only reports these (on the pod, in a bind answer, in its log), so the
//! kind says what an operator should look at, and the text is the service's own words.

/// A failed call to the cache cluster or the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The dataset, pod or node named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The call was refused: credentials, permissions, a quota or a bad request. Trying again
    /// will not help.
    #[error("{0}")]
    Refused(String),
    /// The service did not answer or failed: worth trying again.
    #[error("{0}")]
    Unavailable(String),
}
