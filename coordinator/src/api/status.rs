//! The one place the service layer meets gRPC: who the caller is, read
//! from the TLS connection, and [`Error`] <-> [`Status`].

use crate::revocation;
use crate::service::{Caller, Code, Error};
use corral_proto::identity::peer_identity;
use tonic::{Request, Status};

/// The caller of `req`, as the service layer sees it.
pub fn caller_of<T>(req: &Request<T>) -> Caller {
    Caller::new(
        peer_identity(req).map_err(Error::from),
        revocation::caller(req).map(|(fp, _)| fp),
        req.remote_addr().map(|a| a.ip().to_canonical()),
    )
}

const CODES: &[(Code, tonic::Code)] = &[
    (Code::InvalidArgument, tonic::Code::InvalidArgument),
    (Code::NotFound, tonic::Code::NotFound),
    (Code::AlreadyExists, tonic::Code::AlreadyExists),
    (Code::FailedPrecondition, tonic::Code::FailedPrecondition),
    (Code::PermissionDenied, tonic::Code::PermissionDenied),
    (Code::Unauthenticated, tonic::Code::Unauthenticated),
    (Code::Unavailable, tonic::Code::Unavailable),
    (Code::ResourceExhausted, tonic::Code::ResourceExhausted),
    (Code::DeadlineExceeded, tonic::Code::DeadlineExceeded),
    (Code::Cancelled, tonic::Code::Cancelled),
    (Code::Aborted, tonic::Code::Aborted),
    (Code::OutOfRange, tonic::Code::OutOfRange),
    (Code::Unimplemented, tonic::Code::Unimplemented),
    (Code::DataLoss, tonic::Code::DataLoss),
    (Code::Unknown, tonic::Code::Unknown),
    (Code::Internal, tonic::Code::Internal),
];

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = CODES
            .iter()
            .find(|(c, _)| *c == e.code())
            .map_or(tonic::Code::Internal, |(_, t)| *t);
        Status::new(code, e.message())
    }
}

/// An agent's or a client library's status, passed on with its code.
impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let code = CODES
            .iter()
            .find(|(_, t)| *t == s.code())
            .map_or(Code::Unknown, |(c, _)| *c);
        Error::new(code, s.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_the_round_trip() {
        for (code, grpc) in CODES {
            let s = Status::from(Error::new(*code, "m"));
            assert_eq!((s.code(), s.message()), (*grpc, "m"));
            assert_eq!(Error::from(s).code(), *code);
        }
    }
}
