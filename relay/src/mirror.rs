//! How the relay's store rows and the session protocol's messages map onto each other: the
//! mirror of an agent's session ([`SessionRow`] ↔ `SessionInfo`) and journal records
//! ([`RecordRow`] ↔ `Record`). The store does not interpret the values it keeps; this module
//! is the one place that does.

use remote_proto::session::{CommandStarted, Exit, Output, Record, SessionInfo, record};

use crate::store::{RecordRow, SessionRow};

/// `RecordRow::kind` values: the field numbers of `Record.kind`.
const KIND_OUTPUT: i32 = 3;
const KIND_STARTED: i32 = 4;
const KIND_EXIT: i32 = 5;

/// Longest name, owner or endpoint kept from an agent's report.
const MAX_TEXT: usize = 256;

fn clip(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// The row that mirrors `info` on `agent`.
pub fn session_row(agent: &str, info: &SessionInfo) -> SessionRow {
    SessionRow {
        id: clip(&info.id),
        agent: agent.to_string(),
        owner: clip(&info.owner),
        name: clip(&info.name),
        shape: info.shape,
        state: info.state,
        created_unix: info.created_unix,
        last_output_unix: info.last_output_unix,
        endpoint: clip(&info.endpoint),
    }
}

/// What the relay knows of a session, as the protocol describes one.
pub fn session_info(row: &SessionRow, next_seq: u64, acked_seq: u64) -> SessionInfo {
    SessionInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        shape: row.shape,
        state: row.state,
        endpoint: row.endpoint.clone(),
        created_unix: row.created_unix,
        last_output_unix: row.last_output_unix,
        next_seq,
        acked_seq,
        transport: "relay".into(),
        ..Default::default()
    }
}

/// A record as stored (its output moved, not copied). `None` for a record without a kind
/// (nothing to keep).
pub fn record_row(r: Record) -> Option<RecordRow> {
    let mut row = RecordRow {
        seq: r.seq,
        command_id: r.command_id,
        ..Default::default()
    };
    match r.kind? {
        record::Kind::Output(o) => {
            row.kind = KIND_OUTPUT;
            row.stream = o.stream;
            row.data = o.data;
        }
        record::Kind::Started(s) => {
            row.kind = KIND_STARTED;
            row.command = Some(s.command);
        }
        record::Kind::Exit(e) => {
            row.kind = KIND_EXIT;
            row.exit_code = Some(e.code);
            row.signal = (!e.signal.is_empty()).then_some(e.signal);
        }
    }
    Some(row)
}

/// The record a stored row holds.
pub fn record(row: RecordRow) -> Record {
    let kind = match row.kind {
        KIND_STARTED => record::Kind::Started(CommandStarted {
            command: row.command.unwrap_or_default(),
        }),
        KIND_EXIT => record::Kind::Exit(Exit {
            code: row.exit_code.unwrap_or(-1),
            signal: row.signal.unwrap_or_default(),
        }),
        _ => record::Kind::Output(Output {
            stream: row.stream,
            data: row.data,
        }),
    };
    Record {
        seq: row.seq,
        command_id: row.command_id,
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_proto::session::Stream;

    #[test]
    fn records_survive_the_store() {
        let records = [
            Record {
                seq: 1,
                command_id: 7,
                kind: Some(record::Kind::Started(CommandStarted {
                    command: "echo hi".into(),
                })),
            },
            Record {
                seq: 2,
                command_id: 7,
                kind: Some(record::Kind::Output(Output {
                    stream: Stream::Stderr as i32,
                    data: b"hi\n".to_vec(),
                })),
            },
            Record {
                seq: 3,
                command_id: 7,
                kind: Some(record::Kind::Exit(Exit {
                    code: -1,
                    signal: "KILL".into(),
                })),
            },
        ];
        for r in records {
            let row = record_row(r.clone()).expect("a kind");
            assert_eq!(record(row), r);
        }
        assert!(
            record_row(Record {
                seq: 4,
                command_id: 0,
                kind: None
            })
            .is_none()
        );
    }
}
