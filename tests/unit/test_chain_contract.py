"""The chain's shared constants and registrations, without a kernel."""

from __future__ import annotations

from services.common.datapath import (
    CHAIN_GENERATION_BIT,
    CHAIN_GENERATIONS,
    NUM_SLOTS,
    XFRM_MARK_MASK,
    CgroupOrder,
    Hook,
    Slot,
    TcPriority,
    XfrmMark,
    c_header,
)
from services.orchestrator.chain import Registration


def test_chain_word_keeps_slots_and_generation_apart() -> None:
    assert CHAIN_GENERATIONS == 2
    assert (1 << NUM_SLOTS) - 1 < CHAIN_GENERATION_BIT  # every slot bit sits below the generation bit
    header = c_header()
    assert f"#define WEIR_CHAIN_GENERATION_BIT {CHAIN_GENERATION_BIT}" in header
    assert f"#define WEIR_CHAIN_GENERATIONS {CHAIN_GENERATIONS}" in header


def test_side_hook_order_has_one_owner_per_place() -> None:
    for table in (TcPriority, CgroupOrder, XfrmMark):
        values = [m.value for m in table]
        assert len(values) == len(set(values)), f"{table.__name__} gives two hooks one place"
    assert min(TcPriority) == TcPriority.ENTRY  # the chain's entry runs before everything beside it
    assert all(m.value & ~XFRM_MARK_MASK == 0 for m in XfrmMark)  # marks stay inside their field


def test_registration_round_trips_through_the_store_document() -> None:
    reg = Registration(Hook.TO_CONTAINER, Slot.LB_REPLY, "lb", "/sys/fs/bpf/n/lb/lb_to_container", 42)
    assert reg.key == "TO_CONTAINER/LB_REPLY"
    assert Registration.from_doc(reg.key, reg.doc()) == reg
