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
import subprocess, sys, time, uuid
from confluent_kafka import Producer, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

port = 19094
broker = subprocess.Popen(["tansu", "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
    "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(2)
    bootstrap = f"127.0.0.1:{port}"
    topic = "t" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result()
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
finally:
    broker.terminate()
