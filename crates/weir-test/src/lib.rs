//! Test support: real servers started for the tests that need them.
//!
//! [`PgServer`] is a throwaway PostgreSQL cluster made from the installed server binaries
//! (`initdb`, `pg_ctl`): its own temporary directory, a free loopback port, logical WAL on.
//! [`PgServer::shared`] gives every test in a test binary the same cluster; a watchdog
//! stops it when the test process ends, however it ends.

mod pg;

pub use pg::PgServer;
