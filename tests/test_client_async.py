"""The async client: same surface as the sync one, same rules, asyncio races.

The rules themselves live in machine_sync._core and are covered operation by
operation in test_client.py; here each operation runs once through the async
carrier, plus what is specific to asyncio (tasks racing, async pools)."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from client_support import assert_matches_store, round_trips
from machine_sync.client import AsyncClient, Client
from machine_sync.errors import (
    DatabaseError,
    DatabaseUnreachable,
    InvalidStatus,
    InvalidTransition,
    MachineBusy,
    NotCurrentProcess,
    UnknownMachine,
)

from machines import add_machine, assert_consistent, machine, wait_until_lock_waiting


def public_methods(cls: type) -> dict[str, Any]:
    return {name: member for name, member in vars(cls).items() if not name.startswith("_")}


def test_async_and_sync_surfaces_are_the_same():
    sync, async_ = public_methods(Client), public_methods(AsyncClient)
    assert sorted(sync) == sorted(async_)
    for name, method in sync.items():
        twin = async_[name]
        assert inspect.iscoroutinefunction(twin), name
        assert not inspect.iscoroutinefunction(method), name
        assert inspect.signature(twin) == inspect.signature(method), name
        assert method.__doc__
        assert twin.__doc__ == f"See :meth:`Client.{name}`."


def test_async_client_refuses_a_sync_pool():
    with pytest.raises(TypeError, match="use Client"):
        AsyncClient(ConnectionPool("", open=False))  # type: ignore[arg-type]


async def walk_through(aconn: psycopg.AsyncConnection[Any], machine_id: uuid.UUID) -> list[Any]:
    client = AsyncClient(aconn)
    first, second = uuid.uuid4(), uuid.uuid4()
    seen: list[Any] = [await client.start_process(machine_id, first)]
    with pytest.raises(MachineBusy) as busy:
        await client.start_process(machine_id, second)
    assert busy.value.process_id == first
    with pytest.raises(NotCurrentProcess) as late:
        await client.complete_process(machine_id, second)
    assert (late.value.sqlstate, late.value.status, late.value.process_id) == (
        "MS005",
        "processing",
        first,
    )
    seen.append(await client.complete_process(machine_id, first))
    seen.append(await client.start_process(machine_id, second))
    seen.append(await client.stop_process(machine_id, second))
    seen.append(await client.fail_process(machine_id, "valve", uuid.uuid4()))
    with pytest.raises(InvalidTransition):
        await client.start_process(machine_id, first)
    with pytest.raises(InvalidStatus):
        await client.set_status(machine_id, "melted")
    seen.append(await client.set_status(machine_id, "Offline"))
    assert await client.get(machine_id) == seen[-1]
    assert [m.id for m in await client.list()] == [machine_id]
    with pytest.raises(UnknownMachine):
        await client.get(uuid.uuid4())
    assert await client.drift() == []
    assert await client.reconcile() == []
    assert await client.mode() == "compat"
    change = await client.set_mode("strict")
    assert (change.previous, change.current) == ("compat", "strict")
    return seen


def test_every_operation_through_an_async_connection(db, conn):
    machine_id = add_machine(conn, status="idle")

    async def main() -> list[Any]:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as aconn:
            return await walk_through(aconn, machine_id)

    seen = asyncio.run(main())
    assert [m.status for m in seen] == [
        "processing",
        "idle",
        "processing",
        "idle",
        "error",
        "offline",
    ]
    assert seen[4].failure_description == "valve"
    assert_matches_store(conn, seen[-1])
    assert_consistent(conn)


def test_in_async_pipeline_mode_what_a_call_returns_is_committed(db, conn):
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()

    started: list[Any] = []

    async def main() -> None:
        aconn = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
        async with aconn, aconn.pipeline():
            started.append(await AsyncClient(aconn).start_process(machine_id, run))
            await aconn.execute("SELECT 1 / 0")

    with pytest.raises(psycopg.errors.DivisionByZero):
        asyncio.run(main())
    assert [m.current_process_id for m in started] == [run]
    assert machine(conn, machine_id)["current_process_id"] == run
    assert_consistent(conn)


def test_in_async_pipeline_mode_an_earlier_statements_failure_is_not_the_calls(db, conn):
    """As with Client: the caller's failed statement, queued before the call
    and not yet read, is not reported as the call's own refusal."""
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()
    raised: list[BaseException] = []

    async def main() -> None:
        aconn = await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
        async with aconn, aconn.pipeline():
            client = AsyncClient(aconn)
            await aconn.execute("SELECT * FROM no_such_table")
            try:
                await client.start_process(machine_id, run)
            except DatabaseError as exc:
                raised.append(exc)
            assert machine(conn, machine_id)["status"] == "idle"
            await client.start_process(machine_id, run)

    asyncio.run(main())
    assert [type(exc) for exc in raised] == [DatabaseError]
    assert "earlier statement in this pipeline failed" in str(raised[0])
    assert machine(conn, machine_id)["current_process_id"] == run
    assert_consistent(conn)


def test_async_pool(db, conn):
    machine_id = add_machine(conn, status="idle")

    async def main() -> None:
        async with AsyncConnectionPool(
            db.dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
        ) as pool:
            client = AsyncClient(pool)
            process = uuid.uuid4()
            await client.start_process(machine_id, process)
            assert (await client.get(machine_id)).current_process_id == process
            async with pool.connection() as pooled:
                pass
            with round_trips(pooled) as trips:
                await client.complete_process(machine_id, process)
            assert trips.count == 1

    asyncio.run(main())
    assert machine(conn, machine_id)["status"] == "idle"


def test_async_pool_without_server_is_unreachable():
    async def main() -> None:
        async with AsyncConnectionPool(
            "host=127.0.0.1 port=1 connect_timeout=1", min_size=1, timeout=0.3, open=False
        ) as pool:
            await AsyncClient(pool).list()

    with pytest.raises(DatabaseUnreachable):
        asyncio.run(main())


def test_async_operations_are_one_round_trip(db, conn):
    machine_id = add_machine(conn, status="idle")

    async def main() -> dict[str, int]:
        counted = {}
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as aconn:
            client = AsyncClient(aconn)
            process = uuid.uuid4()
            for name, call in {
                "start_process": client.start_process(machine_id, process),
                "complete_process": client.complete_process(machine_id, process),
                "fail_process": client.fail_process(machine_id, "boom"),
                "set_status": client.set_status(machine_id, "idle"),
                "get": client.get(machine_id),
            }.items():
                with round_trips(aconn) as trips:
                    await call
                counted[name] = trips.count
        return counted

    assert asyncio.run(main()) == {
        "start_process": 1,
        "complete_process": 1,
        "fail_process": 1,
        "set_status": 1,
        "get": 1,
    }


def test_simultaneous_starts_from_tasks_have_one_winner(db, conn):
    machine_id = add_machine(conn, status="idle")
    contenders = 8

    async def main() -> dict[uuid.UUID, Any]:
        connections = [
            await psycopg.AsyncConnection.connect(db.dsn, autocommit=True)
            for _ in range(contenders)
        ]
        try:
            processes = [uuid.uuid4() for _ in connections]
            results = await asyncio.gather(
                *(
                    AsyncClient(c).start_process(machine_id, p)
                    for c, p in zip(connections, processes, strict=True)
                ),
                return_exceptions=True,
            )
        finally:
            for c in connections:
                await c.close()
        return dict(zip(processes, results, strict=True))

    outcomes = asyncio.run(main())
    winners = [p for p, o in outcomes.items() if not isinstance(o, BaseException)]
    assert len(winners) == 1
    losers = [o for o in outcomes.values() if isinstance(o, BaseException)]
    assert len(losers) == contenders - 1
    for lost in losers:
        assert isinstance(lost, MachineBusy)
        assert lost.process_id == winners[0]
    assert machine(conn, machine_id)["current_process_id"] == winners[0]
    assert_consistent(conn)


def test_waiting_task_sees_the_winners_commit(db, conn):
    machine_id = add_machine(conn, status="idle")
    first, second = uuid.uuid4(), uuid.uuid4()

    async def main() -> BaseException | Any:
        async with (
            await psycopg.AsyncConnection.connect(db.dsn) as winner,
            await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as loser,
        ):
            await AsyncClient(winner).start_process(machine_id, first)  # locked, uncommitted
            attempt = asyncio.create_task(AsyncClient(loser).start_process(machine_id, second))
            await asyncio.to_thread(wait_until_lock_waiting, conn, loser.info.backend_pid)
            await winner.commit()
            return (await asyncio.gather(attempt, return_exceptions=True))[0]

    outcome = asyncio.run(main())
    assert isinstance(outcome, MachineBusy)
    assert outcome.process_id == first
    assert str(first) in str(outcome)
