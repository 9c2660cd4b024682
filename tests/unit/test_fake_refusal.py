"""The fake refuses, loudly and early, what a model declares that it cannot model; an opt-out leaves it out."""

from __future__ import annotations

import attrs
import pytest
from sqlalchemy import (
    DDL,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    event,
    func,
    literal_column,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import registry, relationship

import uow
from uow import errors

metadata = MetaData()
mapper_registry = registry(metadata=metadata)


@attrs.define(eq=False, slots=False)
class Checked:
    id: int
    qty: int


@attrs.define(eq=False, slots=False)
class Texted:
    id: int
    qty: int


@attrs.define(eq=False, slots=False)
class Computing:
    id: int
    qty: int
    double: int | None = None


@attrs.define(eq=False, slots=False)
class Stamped:
    id: int
    created: object = None


@attrs.define(eq=False, slots=False)
class Literal:
    id: int
    status: str | None = None
    level: int | None = None


@attrs.define(eq=False, slots=False)
class Triggered:
    id: int


@attrs.define(eq=False, slots=False)
class Dynamic:
    id: int


mapper_registry.map_imperatively(
    Checked,
    Table(
        "refusal_checked",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("qty", Integer, nullable=False),
        CheckConstraint(literal_column("qty") >= 0, name="ck_refusal_qty_positive"),
    ),
)
mapper_registry.map_imperatively(
    Texted,
    Table(
        "refusal_texted",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("qty", Integer, nullable=False),
        CheckConstraint(text("qty % 2 = 0"), name="ck_refusal_even"),
    ),
)
mapper_registry.map_imperatively(
    Computing,
    Table(
        "refusal_computing",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("qty", Integer, nullable=False),
        Column("double", Integer, Computed("qty * 2")),
    ),
)
mapper_registry.map_imperatively(
    Stamped,
    Table(
        "refusal_stamped",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("created", DateTime, server_default=func.now()),
    ),
)
mapper_registry.map_imperatively(
    Literal,
    Table(
        "refusal_literal",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("status", String(10), server_default="new"),
        Column("level", Integer, server_default=text("3")),
    ),
)
triggered = Table("refusal_triggered", metadata, Column("id", Integer, primary_key=True, autoincrement=False))
event.listen(
    triggered,
    "after_create",
    DDL("CREATE TRIGGER refusal_stamp AFTER INSERT ON refusal_triggered BEGIN SELECT 1; END"),
)
mapper_registry.map_imperatively(Triggered, triggered)
mapper_registry.map_imperatively(
    Dynamic,
    Table("refusal_dynamic", metadata, Column("id", Integer, primary_key=True, autoincrement=False)),
    properties={"children": relationship(Checked, primaryjoin="foreign(Checked.id) == Dynamic.id", lazy="dynamic")},
)


@attrs.define(eq=False, slots=False)
class Cascading:
    id: int
    checked_id: int


mapper_registry.map_imperatively(
    Cascading,
    Table(
        "refusal_cascading",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column(
            "checked_id",
            Integer,
            ForeignKey("refusal_checked.id", onupdate="CASCADE", name="fk_refusal_cascading"),
            nullable=False,
        ),
    ),
)


@attrs.define(eq=False, slots=False)
class Lowered:
    id: int
    email: str


@attrs.define(eq=False, slots=False)
class Partial:
    id: int
    code: str
    active: int


@attrs.define(eq=False, slots=False)
class NotDistinct:
    id: int
    code: str
    region: str | None = None


lowered = Table(
    "refusal_lowered",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("email", String(50), nullable=False),
)
Index("ix_refusal_lower_email", func.lower(lowered.c.email), unique=True)
mapper_registry.map_imperatively(Lowered, lowered)
partial = Table(
    "refusal_partial",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("code", String(10), nullable=False),
    Column("active", Integer, nullable=False),
)
Index(
    "ix_refusal_active_code",
    partial.c.code,
    unique=True,
    postgresql_where=partial.c.active == 1,
    sqlite_where=partial.c.active == 1,
)
mapper_registry.map_imperatively(Partial, partial)
mapper_registry.map_imperatively(
    NotDistinct,
    Table(
        "refusal_not_distinct",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("code", String(10), nullable=False),
        Column("region", String(10)),
        UniqueConstraint("code", "region", name="uq_refusal_code_region", postgresql_nulls_not_distinct=True),
    ),
)


class Refusals(uow.UnitOfWork):
    checked = uow.repository(Checked)
    texted = uow.repository(Texted)
    computing = uow.repository(Computing)
    stamped = uow.repository(Stamped)
    literal = uow.repository(Literal)
    triggered = uow.repository(Triggered)
    dynamic = uow.repository(Dynamic)
    cascading = uow.repository(Cascading)
    lowered = uow.repository(Lowered)
    partial = uow.repository(Partial)
    not_distinct = uow.repository(NotDistinct)


class FakeRefusals(uow.FakeUnitOfWork, Refusals):
    pass


def refused(unit: FakeRefusals, name: str) -> str:
    """The message of the ConfigurationError that building repository *name* raises in a block."""
    with unit, pytest.raises(errors.ConfigurationError) as caught:
        getattr(unit, name)
    return str(caught.value)


@pytest.mark.parametrize(
    ("repository", "named", "opt_out"),
    [
        ("texted", "ck_refusal_even", "ck_refusal_even"),
        ("computing", "refusal_computing.double", "refusal_computing.double"),
        ("stamped", "refusal_stamped.created", "refusal_stamped.created"),
        ("triggered", "refusal_triggered trigger", "refusal_triggered trigger"),
        ("cascading", "ON UPDATE CASCADE", "fk_refusal_cascading"),
        ("lowered", "on an expression", "ix_refusal_lower_email"),
        ("partial", "which is partial", "ix_refusal_active_code"),
        ("not_distinct", "NULLS NOT DISTINCT", "uq_refusal_code_region"),
    ],
)
def test_an_unmodelled_feature_is_refused_by_name_until_opted_out(repository: str, named: str, opt_out: str) -> None:
    """SQL-text CHECKs, computed columns, function defaults, triggers, ON UPDATE actions, and unique indexes on
    expressions, partial or with NULLS NOT DISTINCT: refused unless opted out."""
    message = refused(FakeRefusals(), repository)
    assert named in message
    assert "unenforced=" in message
    unit = FakeRefusals(unenforced={opt_out})
    with unit:
        assert getattr(unit, repository).count() == 0


def test_a_dynamic_relationship_is_refused_without_an_opt_out() -> None:
    """lazy='dynamic' queries the database itself: the fake refuses the model and says what to do."""
    message = refused(FakeRefusals(unenforced={"anything"}), "dynamic")
    assert "Dynamic.children" in message
    assert "lazy='select'" in message


def test_a_check_constraint_given_as_an_expression_is_enforced() -> None:
    """A CHECK that SQLAlchemy can evaluate refuses a violating row with IntegrityError naming it; other rows pass."""
    unit = FakeRefusals()
    with unit:
        unit.checked.add(Checked(1, 0))
        unit.commit()
    with unit:
        unit.checked.add(Checked(2, -1))
        with pytest.raises(IntegrityError, match="ck_refusal_qty_positive"):
            unit.commit()
    assert [{"id": 1, "qty": 0}] == unit.database.rows(Checked)


def test_an_enforced_check_constraint_can_be_opted_out_by_name() -> None:
    """A CHECK named in unenforced= is left unchecked, as the opt-out says."""
    unit = FakeRefusals(unenforced=("ck_refusal_qty_positive",))
    with unit:
        unit.checked.add(Checked(2, -1))
        unit.commit()
    assert [{"id": 2, "qty": -1}] == unit.database.rows(Checked)


def test_literal_server_defaults_are_applied_at_flush() -> None:
    """A literal server default, a string or a text() number, fills an unset column at flush, in the column's type."""
    unit = FakeRefusals()
    with unit:
        unit.literal.add(Literal(1))
        unit.commit()
    assert [{"id": 1, "status": "new", "level": 3}] == unit.database.rows(Literal)


def test_unenforced_refuses_a_single_string() -> None:
    """unenforced='name' would be read letter by letter: it raises ConfigurationError saying to pass a tuple."""
    with pytest.raises(errors.ConfigurationError, match=r"\('ck_refusal_even',\)"):
        FakeRefusals(unenforced="ck_refusal_even")


def test_an_opted_out_unique_index_on_an_expression_is_left_out_not_applied_to_its_column() -> None:
    """Left out knowingly, a unique index on lower(email) checks nothing: not even plain equality of the column."""
    unit = FakeRefusals(unenforced={"ix_refusal_lower_email"})
    with unit:
        unit.lowered.add_all([Lowered(1, "ann@example.com"), Lowered(2, "ann@example.com")])
        unit.commit()
    assert [row["email"] for row in unit.database.rows(Lowered)] == ["ann@example.com", "ann@example.com"]


def test_an_opted_out_on_update_cascade_leaves_a_change_of_the_referenced_key_unchecked() -> None:
    """Opted out, a foreign key with ON UPDATE CASCADE checks nothing on update: the key may change, unreferenced."""
    unit = FakeRefusals(unenforced={"fk_refusal_cascading"})
    with unit:
        unit.checked.add(Checked(1, 5))
        unit.commit()
    with unit:
        unit.cascading.add(Cascading(1, 1))
        unit.commit()
    with unit:
        unit.checked.get(1).id = 2
        unit.commit()
    assert [row["id"] for row in unit.database.rows(Checked)] == [2]
    assert [row["checked_id"] for row in unit.database.rows(Cascading)] == [1]  # not cascaded: left out knowingly
