"""Consumer-only throughput from a Tansu broker: how fast librdkafka alone reads a topic like the
bench's (8 partitions, ~280-byte records), with no engine and no database, with librdkafka's
default `fetch.wait.max.ms` (500) and with 10 and 50 ms. Tansu 0.6 holds every fetch for up to
that long (half of it when 250 ms or more) even when it has records to return, so the default
caps a consumer at one fetch (at most 5 MB) per ~250 ms.

    pip install confluent-kafka   # not needed by the tests
    python3 benches/tansu_consume.py [RECORDS]   # default 400000; needs `tansu` on PATH
"""
import json, os, sys, time, uuid
from confluent_kafka import Producer, Consumer
from tansu_broker import tansu_topic

n = int(sys.argv[1]) if len(sys.argv) > 1 else 400000
with tansu_topic(19093, 8) as (broker, bootstrap, topic):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    payload = json.dumps({"type": "OrderNoted", "id": str(uuid.uuid4()), "stream_id": str(uuid.uuid4()),
        "stream_version": 7, "occurred_at": "2024-05-01T10:00:00Z", "data": {"note": "x" * 100}}).encode()
    t0 = time.time()
    for i in range(n):
        while True:
            try:
                p.produce(topic, payload, key=str(i % 100000).encode(), partition=i % 8)
                break
            except BufferError:
                p.poll(0.01)
    p.flush()
    print(f"produced {n} in {time.time()-t0:.1f} s")
    for props in [{}, {"fetch.wait.max.ms": "10"}, {"fetch.wait.max.ms": "50"}]:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                      "enable.auto.commit": "false", "queued.max.messages.kbytes": "16384", **props})
        c.subscribe([topic])
        got = 0; first = None
        while got < n:
            msgs = c.consume(num_messages=10000, timeout=1.0)
            if msgs and first is None:
                first = time.time()
            got += len(msgs)
        secs = time.time() - first
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open(f"/proc/{broker.pid}/stat") as fh:
            st = fh.read().split()
        print(f"  python cpu so far {ru.ru_utime + ru.ru_stime:.2f} s; tansu cpu so far {(int(st[13]) + int(st[14])) / os.sysconf('SC_CLK_TCK'):.2f} s")
        print(f"consumed {got} in {secs:.2f} s: {got/secs:,.0f} records/s {props}")
        c.close()
