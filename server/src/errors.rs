//! What a client is told about an error, whatever the transport: the
//! domain's own message for its mistakes, a generic one for the server's
//! failures (whose cause goes to the server log). Status codes come from
//! each transport's table over [`flywheel_router::ErrorKind`].

use flywheel_router::Classified;

/// The generic message of a server-side failure.
pub const INTERNAL_MESSAGE: &str = "internal error; see the server log";

/// The message a client sees for `error`.
pub fn public_message(error: &(impl Classified + ?Sized)) -> String {
    if error.hides_cause() {
        tracing::error!(error = %error, cause = ?error.source(), "request failed");
        INTERNAL_MESSAGE.into()
    } else {
        error.to_string()
    }
}
