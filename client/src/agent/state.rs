//! The agent's command state machine, without I/O: which command runs, which wait (FIFO),
//! which were already handled (so that a QoS 1 redelivery is not run twice), and what a cancel
//! or an expired deadline means. The runtime feeds it commands and the clock and acts on what
//! it answers.

use std::collections::{HashMap, VecDeque};

use pollen_proto::device::{Command, CommandKind};
use pollen_proto::fleet::Codec;
use prost::Message;

use crate::client::ClientError;

/// Longest request id accepted. Ids are echoed in every reply, and replies must stay far below
/// the MQTT payload limit.
pub const MAX_REQUEST_ID_CHARS: usize = 256;

/// How long a handled request id is remembered after its deadline (or after it was handled,
/// without a deadline). Redeliveries come within seconds; an hour is plenty.
pub const REMEMBER_MS: u64 = 60 * 60 * 1000;

/// Decodes a command payload and checks that it can be answered at all (a usable request id).
/// An error here means the payload is ignored: there is nobody to reply to.
pub fn parse_command(payload: &[u8]) -> Result<Command, String> {
    let command = Command::decode(payload).map_err(|e| format!("not a Command: {e}"))?;
    let id = &command.request_id;
    if id.is_empty() {
        return Err("command has an empty request_id".into());
    }
    if id.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(format!(
            "request_id is {} characters long; at most {MAX_REQUEST_ID_CHARS} are accepted",
            id.chars().count()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("request_id {id:?} contains control characters"));
    }
    Ok(command)
}

/// The command's kind, if this build knows it.
pub fn kind(command: &Command) -> Option<CommandKind> {
    CommandKind::try_from(command.kind)
        .ok()
        .filter(|k| *k != CommandKind::Unspecified)
}

/// Checks that a work command carries what its kind needs. Hyper-parameters in `config` are
/// the client's to check.
pub fn validate(command: &Command) -> Result<CommandKind, ClientError> {
    let kind = kind(command).ok_or_else(|| {
        ClientError::bad_instruction(format!(
            "unknown command kind {}; this agent knows FIT, EVALUATE, GET_PARAMETERS, STATISTICS and CANCEL",
            command.kind
        ))
    })?;
    let needs_weights = matches!(kind, CommandKind::Fit | CommandKind::Evaluate);
    let needs_upload = matches!(kind, CommandKind::Fit | CommandKind::GetParameters);
    if needs_weights {
        let Some(get) = command
            .global_weights
            .as_ref()
            .filter(|g| !g.url.is_empty())
        else {
            return Err(ClientError::bad_instruction(format!(
                "{} command has no global_weights.url",
                kind.as_str_name()
            )));
        };
        // A global model is weights (f32, f16 or int8), never a change of something the
        // device does not have.
        if !matches!(
            Codec::try_from(get.codec),
            Ok(Codec::SafetensorsF32 | Codec::SafetensorsF16 | Codec::SafetensorsInt8)
        ) {
            return Err(ClientError::bad_instruction(format!(
                "global_weights.codec {} is not one of the model codecs this agent reads (safetensors f32, f16, int8)",
                get.codec
            )));
        }
        if get.size_bytes == 0 {
            return Err(ClientError::bad_instruction(
                "global_weights.size_bytes is 0; a blob cannot be empty",
            ));
        }
        if get.sha256.is_empty() {
            return Err(ClientError::bad_instruction(
                "global_weights.sha256 is empty; every blob is verified by digest",
            ));
        }
    }
    if kind == CommandKind::Statistics && command.task.is_none() {
        return Err(ClientError::bad_instruction(
            "STATISTICS command has no task: statistics are computed under a task's schema",
        ));
    }
    if needs_upload && command.upload_url.is_empty() {
        return Err(ClientError::bad_instruction(format!(
            "{} command has no upload_url",
            kind.as_str_name()
        )));
    }
    Ok(kind)
}

/// What became of a command handed to [`Scheduler::receive`].
#[derive(Debug)]
pub enum Intake {
    /// Waits its turn.
    Queued,
    /// Already queued, running or handled: not run again.
    Duplicate,
    /// Cannot be worked on; reply with this failure (the id counts as handled).
    Refused(Box<Command>, ClientError),
    /// A cancel removed the command from the queue.
    CancelledQueued,
    /// A cancel hit the running command: stop it and discard its result.
    CancelledRunning,
    /// A cancel for a command already handled: nothing to do.
    CancelTooLate,
    /// A cancel for a command never seen: remembered, so that it is dropped if it arrives.
    CancelUnknown,
}

/// What the runtime should do next.
#[derive(Debug)]
pub enum Next {
    /// Work on this command (it is now the running one).
    Start(Command),
    /// Its deadline passed while it waited: reply `TIMEOUT` (the id counts as handled).
    Expired(Command),
}

/// Commands waiting beyond this are refused: a proxy sends a device one command per phase, so a
/// longer queue means a misbehaving sender, and memory must stay bounded on a gateway.
pub const MAX_QUEUED: usize = 64;

/// One command at a time, the rest in FIFO order, and the ids already handled.
#[derive(Debug, Default)]
pub struct Scheduler {
    queue: VecDeque<Command>,
    /// Request id and deadline of the running command.
    running: Option<(String, u64)>,
    /// Handled request ids and when to forget them (Unix ms).
    handled: HashMap<String, u64>,
    /// `handled` changed since [`Scheduler::take_changed`] was last called.
    changed: bool,
}

fn forget_at(deadline_unix_ms: u64, now_ms: u64) -> u64 {
    deadline_unix_ms.max(now_ms).saturating_add(REMEMBER_MS)
}

impl Scheduler {
    /// Takes in a command from the broker.
    pub fn receive(&mut self, command: Command, now_ms: u64) -> Intake {
        let id = command.request_id.as_str();
        if kind(&command) == Some(CommandKind::Cancel) {
            return self.cancel(id, now_ms);
        }
        if self.knows(id) {
            return Intake::Duplicate;
        }
        match validate(&command) {
            Ok(_) if self.queue.len() >= MAX_QUEUED => {
                self.mark_handled(id, command.deadline_unix_ms, now_ms);
                let e = ClientError::bad_instruction(format!(
                    "{MAX_QUEUED} commands already queued on this device; refused"
                ));
                Intake::Refused(Box::new(command), e)
            }
            Ok(_) => {
                self.queue.push_back(command);
                Intake::Queued
            }
            Err(e) => {
                self.mark_handled(id, command.deadline_unix_ms, now_ms);
                Intake::Refused(Box::new(command), e)
            }
        }
    }

    fn cancel(&mut self, id: &str, now_ms: u64) -> Intake {
        if let Some(pos) = self.queue.iter().position(|c| c.request_id == id) {
            let removed = self.queue.remove(pos);
            let deadline = removed.map_or(0, |c| c.deadline_unix_ms);
            self.mark_handled(id, deadline, now_ms);
            return Intake::CancelledQueued;
        }
        if let Some((running, deadline)) = self.running.take_if(|(r, _)| r == id) {
            self.mark_handled(&running, deadline, now_ms);
            return Intake::CancelledRunning;
        }
        if self.handled.contains_key(id) {
            return Intake::CancelTooLate;
        }
        self.mark_handled(id, 0, now_ms);
        Intake::CancelUnknown
    }

    /// The next command to work on, if none is running.
    pub fn next(&mut self, now_ms: u64) -> Option<Next> {
        if self.running.is_some() {
            return None;
        }
        let command = self.queue.pop_front()?;
        let deadline = command.deadline_unix_ms;
        if deadline != 0 && deadline <= now_ms {
            self.mark_handled(&command.request_id, deadline, now_ms);
            return Some(Next::Expired(command));
        }
        self.running = Some((command.request_id.clone(), deadline));
        Some(Next::Start(command))
    }

    /// The running command `request_id` finished. Returns its deadline, or `None` if it is no
    /// longer the running one (it was cancelled): then its result must be dropped.
    pub fn finish(&mut self, request_id: &str, now_ms: u64) -> Option<u64> {
        let (id, deadline) = self.running.take_if(|(r, _)| r == request_id)?;
        self.mark_handled(&id, deadline, now_ms);
        Some(deadline)
    }

    /// Request id of the running command.
    pub fn running(&self) -> Option<&str> {
        self.running.as_ref().map(|(id, _)| id.as_str())
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether `request_id` is queued, running or handled.
    pub fn knows(&self, request_id: &str) -> bool {
        self.handled.contains_key(request_id)
            || self.running() == Some(request_id)
            || self.queue.iter().any(|c| c.request_id == request_id)
    }

    /// Remembers an id handled before a restart.
    pub fn remember(&mut self, request_id: String, forget_at_ms: u64) {
        self.handled.insert(request_id, forget_at_ms);
    }

    /// Forgets handled ids whose time has come.
    pub fn expire(&mut self, now_ms: u64) {
        let before = self.handled.len();
        self.handled.retain(|_, forget| *forget > now_ms);
        self.changed |= self.handled.len() != before;
    }

    /// The handled ids and when to forget them, if they changed since the last call (to
    /// persist them).
    pub fn take_changed(&mut self) -> Option<&HashMap<String, u64>> {
        std::mem::take(&mut self.changed).then_some(&self.handled)
    }

    fn mark_handled(&mut self, request_id: &str, deadline_unix_ms: u64, now_ms: u64) {
        self.handled
            .insert(request_id.to_string(), forget_at(deadline_unix_ms, now_ms));
        self.changed = true;
    }
}

#[cfg(test)]
mod tests {
    use pollen_proto::device::BlobGet;
    use pollen_proto::fleet::FailureCode;

    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn fit(id: &str) -> Command {
        Command {
            request_id: id.into(),
            kind: CommandKind::Fit as i32,
            round: 3,
            global_weights: Some(BlobGet {
                url: "http://store/global".into(),
                sha256: "ab".repeat(32),
                size_bytes: 10,
                codec: Codec::SafetensorsF32 as i32,
            }),
            upload_url: "http://store/update".into(),
            ..Default::default()
        }
    }

    fn cancel(id: &str) -> Command {
        Command {
            request_id: id.into(),
            kind: CommandKind::Cancel as i32,
            ..Default::default()
        }
    }

    fn started(next: Option<Next>) -> String {
        match next {
            Some(Next::Start(c)) => c.request_id,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn a_flood_of_commands_is_refused_beyond_the_queue_bound() {
        let mut s = Scheduler::default();
        for i in 0..MAX_QUEUED {
            assert!(matches!(
                s.receive(fit(&format!("c{i}")), NOW),
                Intake::Queued
            ));
        }
        match s.receive(fit("one-too-many"), NOW) {
            Intake::Refused(c, e) => {
                assert_eq!(c.request_id, "one-too-many");
                assert_eq!(e.code, FailureCode::BadInstruction);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn commands_run_one_at_a_time_in_arrival_order() {
        let mut s = Scheduler::default();
        for id in ["a", "b", "c"] {
            assert!(matches!(s.receive(fit(id), NOW), Intake::Queued));
        }
        assert_eq!(started(s.next(NOW)), "a");
        assert!(s.next(NOW).is_none(), "a is still running");
        assert_eq!(s.finish("a", NOW), Some(0));
        assert_eq!(started(s.next(NOW)), "b");
        assert_eq!(s.queued(), 1);
    }

    #[test]
    fn a_redelivered_command_is_not_run_twice() {
        let mut s = Scheduler::default();
        s.receive(fit("a"), NOW);
        assert!(matches!(s.receive(fit("a"), NOW), Intake::Duplicate));
        started(s.next(NOW));
        assert!(matches!(s.receive(fit("a"), NOW), Intake::Duplicate));
        s.finish("a", NOW);
        assert!(matches!(s.receive(fit("a"), NOW), Intake::Duplicate));
        assert!(s.next(NOW).is_none());
    }

    #[test]
    fn a_cancelled_queued_command_never_starts() {
        let mut s = Scheduler::default();
        s.receive(fit("a"), NOW);
        s.receive(fit("b"), NOW);
        started(s.next(NOW));
        assert!(matches!(
            s.receive(cancel("b"), NOW),
            Intake::CancelledQueued
        ));
        s.finish("a", NOW);
        assert!(s.next(NOW).is_none());
    }

    #[test]
    fn the_result_of_a_cancelled_running_command_is_dropped() {
        let mut s = Scheduler::default();
        s.receive(fit("a"), NOW);
        s.receive(fit("b"), NOW);
        started(s.next(NOW));
        assert!(matches!(
            s.receive(cancel("a"), NOW),
            Intake::CancelledRunning
        ));
        assert_eq!(s.finish("a", NOW), None, "a's result must be discarded");
        assert_eq!(started(s.next(NOW)), "b");
        assert!(matches!(s.receive(cancel("a"), NOW), Intake::CancelTooLate));
    }

    #[test]
    fn a_cancel_that_overtakes_its_command_drops_the_command() {
        let mut s = Scheduler::default();
        assert!(matches!(s.receive(cancel("a"), NOW), Intake::CancelUnknown));
        assert!(matches!(s.receive(fit("a"), NOW), Intake::Duplicate));
    }

    #[test]
    fn a_command_whose_deadline_passed_while_queued_expires() {
        let mut s = Scheduler::default();
        let mut late = fit("late");
        late.deadline_unix_ms = NOW + 5;
        s.receive(late, NOW);
        assert!(matches!(s.next(NOW + 5), Some(Next::Expired(c)) if c.request_id == "late"));
        assert!(s.knows("late"));
        assert!(s.next(NOW + 5).is_none());
    }

    #[test]
    fn commands_missing_what_they_need_are_refused_with_bad_instruction() {
        let mut s = Scheduler::default();
        let mut no_upload = fit("a");
        no_upload.upload_url.clear();
        let mut unknown = fit("b");
        unknown.kind = 42;
        let mut no_weights = fit("c");
        no_weights.global_weights = None;
        for (command, words) in [
            (no_upload, "no upload_url"),
            (unknown, "unknown command kind 42"),
            (no_weights, "no global_weights.url"),
        ] {
            match s.receive(command, NOW) {
                Intake::Refused(_, e) => {
                    assert_eq!(e.code, FailureCode::BadInstruction);
                    assert!(e.message.contains(words), "{}", e.message);
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert!(s.knows("a") && s.next(NOW).is_none());
        let params = Command {
            request_id: "p".into(),
            kind: CommandKind::GetParameters as i32,
            upload_url: "http://store/p".into(),
            ..Default::default()
        };
        assert!(matches!(s.receive(params, NOW), Intake::Queued));
    }

    #[test]
    fn handled_ids_are_forgotten_after_their_time_and_reported_when_changed() {
        let mut s = Scheduler::default();
        assert!(s.take_changed().is_none());
        s.receive(fit("a"), NOW);
        started(s.next(NOW));
        s.finish("a", NOW);
        assert_eq!(s.take_changed().map(|h| h.len()), Some(1));
        assert!(s.take_changed().is_none());
        s.expire(NOW + REMEMBER_MS - 1);
        assert!(s.knows("a"));
        s.expire(NOW + REMEMBER_MS);
        assert!(!s.knows("a"));
        assert!(s.take_changed().is_some_and(|h| h.is_empty()));
    }

    #[test]
    fn payloads_without_a_usable_request_id_are_malformed() {
        assert!(parse_command(b"\xff\xff\xff").is_err());
        let empty = Command::default().encode_to_vec();
        assert!(
            parse_command(&empty)
                .expect_err("empty id")
                .contains("empty")
        );
        let long = Command {
            request_id: "x".repeat(MAX_REQUEST_ID_CHARS + 1),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(parse_command(&long).is_err());
        let good = fit("ok").encode_to_vec();
        assert_eq!(parse_command(&good).expect("decodes").request_id, "ok");
    }
}
