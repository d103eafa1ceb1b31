"""Where Tansu starts a fetch asked for inside a record batch: 100 records produced to one
partition in batches of ten (offsets 0-9, 10-19, …), then read by a new consumer assigned at
offsets 0, 5, 10, 15 and 37; the first offsets each receives are printed. A Kafka broker returns
the batch holding the offset and the client drops the records before it, so each starts where
it was assigned; Tansu 0.6 starts at the next batch (5 → 10, 15 → 20, 37 → 40): the rest of the
batch is never delivered. A projection restarted (or re-read) from a checkpoint inside a batch
meets this (README, `[kafka.properties]`). Exits 1 if any offset was skipped.

    pip install confluent-kafka   # not needed by the tests
    python3 benches/tansu_mid_batch.py   # needs `tansu` on PATH
"""
import sys
from confluent_kafka import Producer, Consumer, TopicPartition
from tansu_broker import tansu_topic

with tansu_topic(19094, 1) as (broker, bootstrap, topic):
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10})
    for i in range(100):
        producer.produce(topic, key=str(i), value=str(i))
        if i % 10 == 9:
            producer.flush()
    skipped = False
    for start in (0, 5, 10, 15, 37):
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{start}",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, 0, start)])
        offsets = []
        while len(offsets) < 5:
            message = consumer.poll(5)
            if message is None:
                break
            if not message.error():
                offsets.append(message.offset())
        consumer.close()
        skipped |= not offsets or offsets[0] != start
        print(f"assigned at {start}: first offsets {offsets}")
    sys.exit(1 if skipped else 0)
