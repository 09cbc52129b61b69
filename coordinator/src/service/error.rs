//! The service layer's typed error: a code a client can act on and a
//! sentence that names what is wrong and what to do. The API adapters map
//! it to their protocol (gRPC status codes, HTTP statuses) and nothing else.

use std::fmt;

/// What kind of refusal or failure: the gRPC status codes, which every
/// adapter can map (HTTP: 400, 404, 409, 412, 403, 401, 503, 429, 500 ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    ResourceExhausted,
    DeadlineExceeded,
    Cancelled,
    Aborted,
    OutOfRange,
    Unimplemented,
    DataLoss,
    Unknown,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: Code,
    message: String,
}

macro_rules! constructors {
    ($($name:ident => $code:ident),* $(,)?) => {
        impl Error {
            $(
                pub fn $name(message: impl Into<String>) -> Error {
                    Error { code: Code::$code, message: message.into() }
                }
            )*
        }
    };
}

constructors! {
    invalid_argument => InvalidArgument,
    not_found => NotFound,
    already_exists => AlreadyExists,
    failed_precondition => FailedPrecondition,
    permission_denied => PermissionDenied,
    unauthenticated => Unauthenticated,
    unavailable => Unavailable,
    resource_exhausted => ResourceExhausted,
    internal => Internal,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// A failure of the coordinator itself (store, secrets): logged, and
/// reported as internal.
pub fn internal(e: anyhow::Error) -> Error {
    tracing::error!(error = %format!("{e:#}"), "operator request");
    Error::internal(format!("{e:#}"))
}
