//! Names the whole coordinator shares and that depend on nothing: the kinds
//! of durable operation (the `kind` column of `operations`, one file each
//! under [`crate::ops`]) and who the audit trail names for what the
//! coordinator decides by itself. The store, the alerts, the scheduler and
//! the operations all read these, so they sit below every one of them.

pub const CREATE_CLUSTER: &str = "create_cluster";
pub const ADD_NODE: &str = "add_node";
pub const REMOVE_NODE: &str = "remove_node";
pub const PROMOTE: &str = "promote";
pub const RESYNC: &str = "resync";
pub const REBOOT: &str = "reboot";
pub const DELETE_CLUSTER: &str = "delete_cluster";
pub const SET_SYNC: &str = "set_sync";
pub const FAILOVER: &str = "failover";
pub const REJOIN: &str = "rejoin";
pub const BACKUP: &str = "backup";
pub const VERIFY_BACKUP: &str = "verify_backup";
pub const CONFIGURE_BACKUPS: &str = "configure_backups";
pub const RESTORE: &str = "restore";

/// Every kind of durable operation, in the order `docs/ARCHITECTURE.md`
/// lists them (a test keeps the two equal).
pub const KINDS: &[&str] = &[
    CREATE_CLUSTER,
    ADD_NODE,
    REMOVE_NODE,
    PROMOTE,
    FAILOVER,
    REJOIN,
    RESYNC,
    REBOOT,
    DELETE_CLUSTER,
    SET_SYNC,
    BACKUP,
    VERIFY_BACKUP,
    RESTORE,
    CONFIGURE_BACKUPS,
];

/// Operations that run beside the cluster's life: they neither hold back
/// a failover nor silence alerts (a failover makes them fail, if at all,
/// and they are retried by the operator or the next schedule).
pub const BACKGROUND: &[&str] = &[BACKUP, VERIFY_BACKUP];

/// Long operations whose completion is announced (the seed's "notify you
/// when the request is finished"). `migrate` is reserved for the migration
/// issue.
pub const ANNOUNCED_OPERATIONS: &[&str] = &[RESYNC, ADD_NODE, CREATE_CLUSTER, RESTORE, "migrate"];

/// Who requests scheduled backups.
pub const SCHEDULER: &str = "coordinator (backup schedule)";
/// Who the audit trail names for what the coordinator decided by itself.
pub const AUTO_FAILOVER: &str = "coordinator (auto-failover)";
