//! Role checks. TLS already proved the client certificate chains to our CA; this reads the role
//! it grants (its `spiffe://aitbc-backup/<role>/<name>` SAN) and refuses calls the role may not
//! make. The identity is put into the request's extensions for the handlers.

use aitbc_backup_tls::{PeerIdentity, Role};
use tonic::{Request, Status};

/// A tonic interceptor admitting only clients whose certificate grants `role`.
#[derive(Debug, Clone, Copy)]
pub struct RequireRole(pub Role);

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = peer_identity(&request)?;
        if identity.role != self.0 {
            return Err(Status::permission_denied(format!(
                "certificate role `{}` may not call this service; it needs role `{}`",
                identity.role, self.0
            )));
        }
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The identity in the client's certificate.
pub fn peer_identity<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    PeerIdentity::from_certificate_der(leaf.as_ref())
        .map_err(|err| Status::permission_denied(err.to_string()))
}

/// The identity [`RequireRole`] stored in the request.
pub fn authenticated<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    request
        .extensions()
        .get::<PeerIdentity>()
        .cloned()
        .ok_or_else(|| Status::internal("request reached a handler without a role check"))
}
