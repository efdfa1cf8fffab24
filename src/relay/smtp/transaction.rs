//! One transaction on an upstream SMTP session from the pool: MAIL with the recipients known
//! at the start (one flight when the upstream pipelines), later RCPTs, the content (BDAT
//! chunks where the upstream offers CHUNKING, else DATA), then the session goes back to the
//! pool (or is RSET after an aborted or refused transaction, or dropped mid-content). A
//! completed transaction needs no RSET.

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

/// Reply to a start of content that needs no go-ahead from the upstream (BDAT).
const NO_GO_AHEAD_NEEDED: u16 = 354;

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

    /// Announces the content: with CHUNKING nothing goes upstream (the content goes as
    /// BDAT; the reply is a 354 of our own), else `DATA`, answered 354. Any other positive
    /// reply to DATA is a protocol error: the session is broken, and no content is sent
    /// into it.
    pub(crate) async fn start_data(&mut self) -> Result<UpReply, UpstreamError> {
        match self.lease.session().start_content().await {
            Ok(None) => Ok(UpReply {
                code: NO_GO_AHEAD_NEEDED,
                text: "content goes as BDAT".into(),
            }),
            Ok(Some(r)) if r.code == 354 => Ok(r),
            Ok(Some(r)) => {
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

    /// Ends the streamed content; the final verdict (2xx taken, 4xx/5xx refused). After
    /// DATA the transaction is complete either way; after a refused BDAT transfer it may not
    /// be (RFC 3030 leaves it to the server), so the session is RSET before reuse. A reply
    /// that is neither is a protocol error.
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        let chunked = self.lease.session().chunking();
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
                self.open = chunked;
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

/// The verdict on each recipient given to [`SmtpTransaction::begin`], in order.
pub(crate) type RcptVerdicts = Vec<Result<UpReply, UpstreamError>>;

impl SmtpTransaction {
    /// Opens a transaction: takes an authenticated session for `account` from the pool and
    /// sends MAIL and a RCPT for each of `rcpts` (in one flight when the upstream offers
    /// PIPELINING). The MAIL reply and each recipient's verdict; a refused MAIL is an
    /// error (no transaction).
    pub(crate) async fn begin(
        pool: &Pool,
        account: &str,
        (from, params, size): (&ReversePath, &MailParams, Option<usize>),
        rcpts: &[Address],
    ) -> Result<(SmtpTransaction, UpReply, RcptVerdicts), BeginError> {
        let mail = envelope::mail_command(from, params, size);
        let rcpts: Vec<String> = rcpts.iter().map(envelope::rcpt_command).collect();
        let (lease, reply, verdicts) = pool.begin_envelope(account, &mail, &rcpts).await?;
        Ok((SmtpTransaction { lease, open: true }, reply, verdicts))
    }
}
