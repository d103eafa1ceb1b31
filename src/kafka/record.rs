//! The record copy: a polled Kafka message copied into the engine's own [`Record`] (its headers
//! read through librdkafka directly), and the bytes a record holds.

use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message};

use crate::projection::Record;

/// Each topic's name, shared by the records of that topic (a consumer reads few topics).
#[derive(Debug, Default)]
pub(super) struct TopicNames(Vec<Arc<str>>);

impl TopicNames {
    fn get(&mut self, topic: &str) -> Arc<str> {
        match self.0.iter().position(|name| **name == *topic) {
            Some(at) => self.0[at].clone(),
            None => {
                let name: Arc<str> = topic.into();
                self.0.push(name.clone());
                name
            }
        }
    }
}

/// A copy of `message`: key, value, headers and timestamp, its topic's name shared.
pub(super) fn copy_record(message: &BorrowedMessage<'_>, names: &mut TopicNames) -> Record {
    Record {
        topic: names.get(message.topic()),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: headers_of(message),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// The bytes a record holds: key, value, header names and values.
pub fn record_bytes(record: &Record) -> usize {
    record.key.as_ref().map_or(0, Vec::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + record.headers.iter().map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len)).sum::<usize>()
}

/// A message's headers, names and values as the producer wrote them. rdkafka's own iterator
/// panics on a name that is not UTF-8 (`CStr::to_str().unwrap()`), so they are read here through
/// librdkafka directly. A name ends at its first NUL: librdkafka keeps names as C strings.
fn headers_of(message: &BorrowedMessage<'_>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use rdkafka::bindings as rdsys;
    use rdkafka::error::IsError;
    let mut headers: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message is alive for this call; librdkafka owns `headers`, which lives as long
    // as the message, and every name and value is copied before it returns.
    unsafe {
        if rdsys::rd_kafka_message_headers(message.ptr(), &mut headers).is_error() || headers.is_null() {
            return Vec::new();
        }
        let count = rdsys::rd_kafka_header_cnt(headers);
        let mut all = Vec::with_capacity(count);
        for index in 0..count {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size: usize = 0;
            if rdsys::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size).is_error()
                || name.is_null()
            {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes().to_vec();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value as *const u8, size).to_vec());
            all.push((name, value));
        }
        all
    }
}
