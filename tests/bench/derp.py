"""Throughput of the DERP relay over loopback (a benchmark, not a test).

    python3 tests/bench/derp.py [--packets 200000] [--size 1200] [--tls]

Runs a DerpServer in its own process, a receiving client in another, and
sends a fixed number of SendPacket frames from this one as fast as the
socket takes them, 16 frames per write.  In the same run the same bytes, in
the same writes, go through socat (a TCP relay in C) from this process to a
receiving process, as the reference:
mbit_s is DERP's payload rate, socat_mbit_s socat's for the same payload.
Prints a line each, then a JSON summary as the last line.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(os.path.dirname(HERE)))
sys.path.append(os.path.dirname(HERE))

import meshbox  # noqa: E402
import meshproc  # noqa: E402
from derpclient import DerpClient, serve_derp_http, write_self_signed  # noqa: E402

RECEIVE_IDLE = 2.0          # the receiver stops after this long without data


def run_server(port_queue, stop, tls_dir):
    async def main():
        derp = meshbox.DerpServer(meshbox.new_private_key())
        context = pin = None
        if tls_dir:
            cert, key, pin = write_self_signed(Path(tls_dir))
            context = meshbox.tls_server_context(cert, key)
        server = await serve_derp_http(derp, ssl_context=context)
        port_queue.put((server.sockets[0].getsockname()[1], pin))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        port_queue.put(derp.stats())
        server.close()
        derp.close()
    asyncio.run(main())


def run_receiver(port, pin, frame_len, packets, out):
    async def main():
        client = await DerpClient.connect("127.0.0.1", port, pin=pin)
        out.put(client.public_key)
        total, last = 0, None
        try:
            while total < packets * frame_len:
                chunk = await asyncio.wait_for(client.reader.read(1 << 20), RECEIVE_IDLE)
                if not chunk:
                    break
                total, last = total + len(chunk), time.perf_counter()
        except TimeoutError:
            pass
        out.put((total // frame_len, last))
        await client.close()
    asyncio.run(main())


async def send(port, pin, dst, packets, size):
    client = await DerpClient.connect("127.0.0.1", port, pin=pin)
    data = meshbox.frame(meshbox.FRAME_SEND_PACKET, dst + bytes(size))
    batch = data * 16             # written as the socat reference writes them
    start = time.perf_counter()
    for _ in range(packets // 16):
        client.writer.write(batch)
        await client.writer.drain()
    client.writer.write(data * (packets % 16))
    await client.close()        # flushes what is still buffered
    return start


def run_sink(port_queue, total, out):
    """Accept one connection and read total bytes; report when the last one arrived."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        conn.settimeout(RECEIVE_IDLE)
        got, last = 0, None
        try:
            while got < total:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got, last = got + len(chunk), time.perf_counter()
        except TimeoutError:
            pass
        conn.close()
    out.put((got, last))


def connect_when_listening(port, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def socat_reference(frame_data, packets):
    """Send packets copies of frame_data through socat; returns (bytes received, seconds)."""
    ports, result = multiprocessing.Queue(), multiprocessing.Queue()
    sink = multiprocessing.Process(target=run_sink, args=(ports, len(frame_data) * packets, result))
    sink.start()
    sink_port = ports.get(timeout=10)
    relay_port = meshproc.free_port()
    relay = subprocess.Popen(["socat", f"TCP-LISTEN:{relay_port},bind=127.0.0.1,reuseaddr",
                              f"TCP:127.0.0.1:{sink_port}"])
    try:
        sender = connect_when_listening(relay_port)
        batch = frame_data * 16
        start = time.perf_counter()
        for _ in range(packets // 16):
            sender.sendall(batch)
        sender.sendall(frame_data * (packets % 16))
        sender.shutdown(socket.SHUT_WR)
        got, last = result.get(timeout=60)
        sender.close()
    finally:
        relay.terminate()
        relay.wait(10)
        sink.join(10)
    return got, (last or start) - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200000)
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args()
    frame_len = meshbox.DERP_FRAME_HEADER_LEN + meshbox.DERP_KEY_LEN + args.size
    with tempfile.TemporaryDirectory() as tls_dir:
        queue, stop = multiprocessing.Queue(), multiprocessing.Event()
        server = multiprocessing.Process(target=run_server,
                                         args=(queue, stop, tls_dir if args.tls else None))
        server.start()
        port, pin = queue.get(timeout=10)
        received = multiprocessing.Queue()
        receiver = multiprocessing.Process(target=run_receiver,
                                           args=(port, pin, frame_len, args.packets, received))
        receiver.start()
        dst = received.get(timeout=10)
        start = asyncio.run(send(port, pin, dst, args.packets, args.size))
        got, last = received.get(timeout=60)
        receiver.join()
        stop.set()
        stats = queue.get(timeout=10)
        server.join()
    seconds = (last or start) - start
    result = {"packets": args.packets, "size": args.size, "tls": args.tls, "received": got,
              "seconds": round(seconds, 3),
              "packets_per_second": round(got / seconds) if seconds > 0 else None,
              "mbit_s": round(got * args.size * 8 / seconds / 1e6, 1) if seconds > 0 else None,
              "server": stats}
    print(f"DERP relay {'TLS' if args.tls else 'TCP'}: {got}/{args.packets} packets of "
          f"{args.size} B in {seconds:.2f} s = {result['packets_per_second']} packets/s, "
          f"{result['mbit_s']} Mbit/s, {stats['packets_dropped']} dropped")
    result["socat_mbit_s"] = result["ratio"] = None
    if shutil.which("socat"):
        frame_data = meshbox.frame(meshbox.FRAME_RECV_PACKET, bytes(meshbox.DERP_KEY_LEN + args.size))
        socat_bytes, socat_seconds = socat_reference(frame_data, args.packets)
        socat_packets = socat_bytes // len(frame_data)
        result["socat_mbit_s"] = round(socat_packets * args.size * 8 / socat_seconds / 1e6, 1)
        if result["mbit_s"]:
            result["ratio"] = round(result["mbit_s"] / result["socat_mbit_s"], 3)
        print(f"socat reference: {socat_packets}/{args.packets} packets in {socat_seconds:.2f} s = "
              f"{result['socat_mbit_s']} Mbit/s; DERP reaches {result['ratio']} of it")
    else:
        print("socat reference: socat is not installed (apt-get install socat)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
