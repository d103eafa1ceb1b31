"""A Tansu broker (memory storage) for the Python probes beside it, with a new topic."""
import contextlib, subprocess, time, uuid
from confluent_kafka.admin import AdminClient, NewTopic


@contextlib.contextmanager
def tansu_topic(port, partitions):
    """Starts `tansu broker` on 127.0.0.1:`port`, creates a topic of `partitions`, and yields
    (the broker's process, its bootstrap address, the topic's name); kills the broker after."""
    broker = subprocess.Popen(["tansu", "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        bootstrap = f"127.0.0.1:{port}"
        topic = "t" + uuid.uuid4().hex[:8]
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            f.result()
        yield broker, bootstrap, topic
    finally:
        broker.kill()
