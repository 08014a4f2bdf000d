//! The count of every RPC a worker answers, by method and outcome: one helper for both of its
//! gRPC services (the cache service and the dataset control service), which use nothing else of
//! each other.

use granary_core::metrics as m;
use granary_proto::ApiError;

pub(crate) fn record<T>(method: &'static str, result: &Result<T, ApiError>) {
    let code = match result {
        Ok(_) => "ok",
        Err(ApiError::NotFound(_)) => "not_found",
        Err(ApiError::NotADirectory(_)) => "not_a_directory",
        Err(ApiError::Stale(_)) => "stale",
        Err(ApiError::Unavailable(_)) => "unavailable",
        Err(ApiError::Invalid(_)) => "invalid",
        Err(ApiError::Corrupt(_)) => "corrupt",
        Err(ApiError::Internal(_)) => "internal",
        Err(ApiError::Denied(_)) => "denied",
        Err(ApiError::Exhausted(_)) => "exhausted",
    };
    metrics::counter!(m::RPC_REQUESTS, "method" => method, "code" => code).increment(1);
}
