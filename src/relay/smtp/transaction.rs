//! One transaction on an upstream SMTP session from the pool: MAIL, RCPT, DATA and the
//! content, then the session goes back to the pool (or is RSET, or dropped mid-content).

use crate::relay::envelope::{self, Address, MailParams, ReversePath};
use crate::relay::pool::{BeginError, Lease, Pool};
use crate::relay::upstream::{UpReply, UpstreamError};

/// One open upstream transaction (MAIL accepted).
#[derive(Debug)]
pub(crate) struct SmtpTransaction {
    lease: Lease,
    /// The upstream holds an unfinished transaction (MAIL accepted, no final reply to the
    /// content yet): the session needs RSET before it serves another one.
    open: bool,
}

impl SmtpTransaction {
    /// Adds a recipient; the upstream's verdict on it.
    pub(crate) async fn rcpt(&mut self, to: &Address) -> Result<UpReply, UpstreamError> {
        self.lease
            .session()
            .command(&envelope::rcpt_command(to))
            .await
    }

    /// The upstream can no longer carry this transaction (the connection broke).
    pub(crate) fn is_broken(&mut self) -> bool {
        self.lease.session().is_broken()
    }

    /// Announces the content (SMTP: `DATA`, answered 354). Any other positive reply is a
    /// protocol error: the session is broken, and no content is sent into it.
    pub(crate) async fn start_data(&mut self) -> Result<UpReply, UpstreamError> {
        match self.lease.session().command("DATA").await {
            Ok(r) if r.code == 354 => Ok(r),
            Ok(r) => {
                self.break_off();
                Err(UpstreamError::Lost(format!(
                    "unexpected reply to DATA: {r}"
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Streams one piece of the content (unstuffed, CRLF line endings, split anywhere)
    /// after [`SmtpTransaction::start_data`]. On an error the transaction is lost (4xx to the
    /// client); nothing more may be sent.
    pub(crate) async fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        self.lease.session().body_chunk(chunk).await
    }

    /// Ends the streamed content; the final verdict (2xx taken, 4xx/5xx refused). The
    /// transaction is complete either way; a reply that is neither is a protocol error.
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        match self.lease.session().body_end().await {
            Ok(r) if (200..300).contains(&r.code) => {
                self.open = false;
                Ok(r)
            }
            Ok(r) => {
                self.break_off();
                Err(UpstreamError::Lost(format!(
                    "unexpected reply to the end of data: {r}"
                )))
            }
            Err(UpstreamError::Reply(r)) => {
                self.open = false;
                Err(UpstreamError::Reply(r))
            }
            Err(e) => Err(e),
        }
    }

    /// Gives up mid-content: the session is marked broken, so it is closed (without the
    /// final dot) when the transaction ends.
    pub(crate) fn break_off(&mut self) {
        self.lease.session().break_off();
    }

    /// Drops the transaction mid-content: the connection is closed without the final dot,
    /// so the upstream never takes the message (and the session is not reused).
    pub(crate) fn abandon(self) {
        drop(self.lease);
    }

    /// Done with the transaction: after a final verdict the session goes back to the pool
    /// (unless it broke); an upstream transaction still open (DATA refused) is RSET first.
    pub(crate) async fn finish(self) {
        if self.open {
            self.abort().await;
        } else {
            self.lease.release(true);
        }
    }

    /// Abandons the transaction (RSET); the session is reused only if RSET worked.
    pub(crate) async fn abort(mut self) {
        let ok = self.lease.session().command("RSET").await.is_ok();
        self.lease.release(ok);
    }
}

impl SmtpTransaction {
    /// Opens a transaction: takes an authenticated session for `account` from the pool
    /// and sends MAIL.
    pub(crate) async fn begin(
        pool: &Pool,
        account: &str,
        from: &ReversePath,
        params: &MailParams,
        size: Option<usize>,
    ) -> Result<(SmtpTransaction, UpReply), BeginError> {
        let cmd = envelope::mail_command(from, params, size);
        let (lease, reply) = pool.begin(account, &cmd).await?;
        Ok((SmtpTransaction { lease, open: true }, reply))
    }
}
