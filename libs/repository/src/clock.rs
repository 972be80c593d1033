//! Time stamps as the repository stores them (RFC 3339, UTC, milliseconds).

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
