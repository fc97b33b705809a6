"""Request status and coalescing, kept in one Azure Table (STATUS_TABLE).

Four kinds of rows:
- request row   PK = requestId, RK = "request" (and "request.1", ... for very large requests): the
  request's calls, each with its group key and booked slot. Written once the slots are booked.
- call row      PK = group key, RK = "<requestId>:<callIndex>": state, since, attempts, why it
  waits and until when, the decoded result when done, and `servedBy` when another call serves it.
- open row      PK = group key, RK = "open": the call of this group that has not gone out yet and
  the calls that joined it. Others may join only once the leader's call row has its `eta`, written
  when its work message is known to be on the queue (shared/status/admission.py).
- received row  PK = "post-<postId>", RK = "received" (fast intake): each request of a post until
  the queue door admits it. Deleted by the upkeep timer once no intake message could still admit
  them (shared/operations/received_sweep.py); request and call rows are kept.

The group key is a hash of (servicePrincipalId, jobId, ruleId, subject), so every row of equal
calls shares one partition: joining a waiting call, closing the group as its call goes out, and
finishing the call with everything it served are each one atomic entity-group transaction.

Modules: table.py (the Protocol over the table and the Azure implementation), rows.py (row names
and limits), admission.py (intake: admit, mark queued, withdraw), progress.py (the worker: close,
waiting, finish), read_model.py (request rows and the status answer, paged), received.py (fast
intake's row per post, read until its requests are admitted), store.py (the one object the app
holds).

Cost per call when nothing coalesces: one transaction at intake (open row + call row), one write
more for a call sent delayed (its slot, which makes its group joinable), one per request for the
request row, one as the call goes out (close + "calling"), one with the result.
"""
