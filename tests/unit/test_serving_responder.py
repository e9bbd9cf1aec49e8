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
