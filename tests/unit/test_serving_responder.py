"""The responder that sends plain requests' final responses off the scheduler's thread: in order, nothing lost."""

import logging
import threading

from deepseek_model_repository.serving.responder import Responder


def test_jobs_run_in_order_on_one_thread_other_than_the_caller():
    responder = Responder()
    ran, threads = [], set()

    def job(i):
        def run():
            ran.append(i)
            threads.add(threading.current_thread().name)
        return run

    for i in range(200):
        responder.submit(job(i))
    responder.close()
    assert ran == list(range(200))
    assert threads == {"deepseek-responder"}


def test_close_runs_what_is_queued_behind_a_slow_job():
    responder = Responder()
    release, ran = threading.Event(), []
    responder.submit(lambda: release.wait(5))
    for i in range(5):
        responder.submit(lambda i=i: ran.append(i))
    assert ran == []  # held behind the first job
    release.set()
    responder.close()
    assert ran == [0, 1, 2, 3, 4]


def test_a_failing_job_is_logged_and_the_next_still_runs(caplog):
    responder = Responder()
    ran = []

    def fails():
        raise RuntimeError("the client's connection is gone")

    with caplog.at_level(logging.WARNING, logger="deepseek_model_repository.responder"):
        responder.submit(fails)
        responder.submit(lambda: ran.append("next"))
        responder.close()
    assert ran == ["next"]
    assert "could not be sent" in caplog.text and "connection is gone" in caplog.text


def test_a_job_submitted_after_close_runs_at_once_on_the_callers_thread():
    responder = Responder()
    responder.close()
    where = []
    responder.submit(lambda: where.append(threading.current_thread()))
    assert where == [threading.current_thread()]


def test_a_submit_that_close_overtakes_is_not_lost():
    """close arriving while a submit is on its way into the queue: the job still runs (before the thread ends)."""
    responder = Responder()
    entered, proceed, ran = threading.Event(), threading.Event(), []

    def target():
        ran.append("target")

    class PausingQueue:  # holds the target's way into the queue until the test lets it go
        def __init__(self, inner):
            self.inner = inner

        def put(self, item):
            if item is target:
                entered.set()
                proceed.wait(5)
            self.inner.put(item)

        def get(self):
            return self.inner.get()

    responder._jobs = PausingQueue(responder._jobs)
    submitter = threading.Thread(target=responder.submit, args=(target,))
    submitter.start()
    assert entered.wait(5)
    closer = threading.Thread(target=responder.close)
    closer.start()
    closer.join(0.2)  # close must wait for the submit in flight, not overtake it
    proceed.set()
    submitter.join(5)
    closer.join(5)
    assert ran == ["target"]
