"""Print what is on the results (or dead-letter) queue, without taking it off the queue."""
from __future__ import annotations

import argparse
import json
import os
import time

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connection", default=os.environ.get("AzureWebJobsStorage"),
                        help="storage connection string (default: $AzureWebJobsStorage)")
    parser.add_argument("--queue", default="provision-results")
    parser.add_argument("--wait", type=float, default=10, help="seconds to wait for a first message")
    args = parser.parse_args()
    if not args.connection:
        parser.error("give --connection or set AzureWebJobsStorage")
    queue = QueueClient.from_connection_string(args.connection, args.queue)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            messages = list(queue.peek_messages(max_messages=32))
        except ResourceNotFoundError:  # created with the first result
            messages = []
        if messages or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for message in messages:
        print(json.dumps(json.loads(message.content), indent=2))
    print(f"({len(messages)} message(s) shown from {args.queue}; peeking shows at most 32)")


if __name__ == "__main__":
    main()
