//! The component contract, the same cases against every component (see
//! `aitbc_backup_tests::conformance`): `<component>::<case>`.

use aitbc_backup_tests::conformance::ledger::{LedgerSubject, Rollback, Wal};
use aitbc_backup_tests::conformance::postgres::PostgresSubject;
use aitbc_backup_tests::conformance::redis::RedisSubject;

/// One test per case for `$subject`, in module `$component`.
macro_rules! conformance {
    ($component:ident: $subject:ty) => {
        mod $component {
            use aitbc_backup_tests::conformance as suite;

            fn install() {
                aitbc_backup_tls::install_crypto_provider();
            }

            #[test]
            fn backup_at_a_cut() {
                install();
                suite::backup_at_a_cut::<$subject>();
            }

            #[test]
            fn fenced_cut() {
                install();
                suite::fenced_cut::<$subject>();
            }

            #[test]
            fn refused_restore() {
                install();
                suite::refused_restore::<$subject>();
            }

            #[test]
            fn trial_restore() {
                install();
                suite::trial_restore::<$subject>();
            }
        }
    };
}

conformance!(postgres: super::PostgresSubject);
conformance!(redis: super::RedisSubject);
conformance!(ledger: super::LedgerSubject<super::Wal>);
conformance!(ledger_rollback_journal: super::LedgerSubject<super::Rollback>);
