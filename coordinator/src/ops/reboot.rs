//! `reboot`: restart one node's engine (term-checked), and wait for a
//! replica to stream again.
//!
//! If the coordinator dies after the restart was sent: the resumed
//! operation restarts the engine once more. The outcome is the same; the
//! cost is a second short pause (of writes, on the primary).

use super::Ctx;
use anyhow::Result;
use corral_proto::pb;
use std::time::Instant;

impl Ctx<'_> {
    pub(crate) async fn reboot(&self) -> Result<()> {
        let node = self.param_str("node")?;
        let m = self.members()?;
        let is_primary = m.primary.id == node;
        self.log(&format!(
            "restarting the engine on {node}{}",
            if is_primary {
                " (the primary: writes pause until it is back)"
            } else {
                ""
            }
        ));
        let began = Instant::now();
        let term = self.cluster()?.term;
        let s = self
            .call(&node, "restarting the engine", |mut c| async move {
                c.restart_engine(pb::RestartEngineRequest { term }).await
            })
            .await?;
        self.coord.fleet.set_engine(&node, s);
        self.log(&format!(
            "{node} is back in {} ms",
            began.elapsed().as_millis()
        ));
        if !is_primary {
            self.wait_streaming(&m.primary.id, &node).await?;
        }
        Ok(())
    }
}
