"""Vectorised simulation of one chunk of patients: numpy arrays per output table, ids already assigned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from healthspace.synth import model as m
from healthspace.synth.codes import ACUTE_CONDITIONS, CHRONIC_CONDITION_CODES, DRUGS, LABS, PROCEDURES, Code
from healthspace.synth.sites import SCENARIO_IDS, SiteProfile

__all__ = [
    "CONDITION_CODES",
    "NO_DAY",
    "TABLES",
    "VISIT_EMERGENCY",
    "VISIT_INPATIENT",
    "VISIT_OUTPATIENT",
    "Chunk",
    "simulate_chunk",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]
Columns = dict[str, npt.NDArray[Any]]

# Output tables in the order they are generated; each keeps a running id across chunks.
TABLES: tuple[str, ...] = ("person", "visit", "condition", "measurement", "drug", "procedure", "consent")

VISIT_OUTPATIENT, VISIT_EMERGENCY, VISIT_INPATIENT = 0, 1, 2

# One code list for conditions: the chronic codes (in CONDITION_MODELS order, CKD by stage), then the
# acute reasons for a visit. Rows carry an index into it.
CONDITION_CODES: tuple[Code, ...] = tuple(
    c for cm in m.CONDITION_MODELS for c in CHRONIC_CONDITION_CODES[cm.key]
) + tuple(c for c, _ in ACUTE_CONDITIONS)
_CHRONIC_FIRST_CODE = np.cumsum([0] + [len(CHRONIC_CONDITION_CODES[cm.key]) for cm in m.CONDITION_MODELS])[
    :-1
]
_ACUTE_FIRST_CODE = sum(len(v) for v in CHRONIC_CONDITION_CODES.values())
_ACUTE_WEIGHTS = np.array([w for _, w in ACUTE_CONDITIONS])
_CONDITION_KEYS = tuple(cm.key for cm in m.CONDITION_MODELS)
_C = {k: i for i, k in enumerate(_CONDITION_KEYS)}
_LAB = {lab.key: i for i, lab in enumerate(LABS)}
_DRUG = {d.key: i for i, d in enumerate(DRUGS)}
_DAYS_SUPPLY = np.array([d.days_supply for d in DRUGS], dtype=np.int64)
_QUANTITY = np.array([d.days_supply * d.units_per_day for d in DRUGS], dtype=np.float64)
_LAB_DECIMALS = np.array([lab.decimals for lab in LABS])
# Follow-up labs are drawn in groups: blood pressure (sbp, dbp) and renal (creatinine, egfr) together.
_LAB_GROUP = np.array([1, 2, 3, 3, 4, 0, 0, 5])  # hba1c, glucose, creatinine, egfr, ldl, sbp, dbp, bmi

_AS_OF = m.day_number(m.AS_OF)
_FU_END = m.day_number(m.FOLLOW_UP_END)
_INDEX_FIRST = m.day_number(m.INDEX_FIRST)
_INDEX_LAST = m.day_number(m.INDEX_LAST)
_CONSENT_UNTIL = m.day_number(m.CONSENT_DECISIONS_UNTIL)
_YEAR = 365.25
_SECONDS_PER_DAY = 86_400
# "No date" in day columns; dates before 1970 are negative, so -1 cannot mean none.
NO_DAY = -1_000_000


@dataclass
class Chunk:
    """Columns of every output table for one chunk.

    Days count from 1970-01-01 (NO_DAY = none); an id of -1 means none.
    """

    patients: int
    person: Columns = field(default_factory=dict)
    visit: Columns = field(default_factory=dict)
    condition: Columns = field(default_factory=dict)
    measurement: Columns = field(default_factory=dict)
    drug: Columns = field(default_factory=dict)
    procedure: Columns = field(default_factory=dict)
    consent: Columns = field(default_factory=dict)

    def rows(self, table: str) -> int:
        cols: Columns = getattr(self, table)
        return len(next(iter(cols.values())))


def _round(x: F64, decimals: int) -> F64:
    return np.round(x, decimals)


def _creatinine_umol(egfr: F64, age: F64, male: B) -> F64:
    """Serum creatinine that gives `egfr` under the CKD-EPI 2021 equation (race-free), in umol/L."""
    kappa = np.where(male, 0.9, 0.7)
    alpha = np.where(male, -0.302, -0.241)
    a = egfr / (142.0 * 0.9938**age * np.where(male, 1.0, 1.012))
    ratio = np.where(a <= 1.0, a ** (-1.0 / 1.2), a ** (1.0 / alpha))
    return np.asarray(kappa * ratio * 88.42, dtype=np.float64)


def _lab_values(
    visit_person: I64,
    is_index: B,
    base: F64,
    age: F64,
    male: B,
    egfr_latent: F64,
    rng: np.random.Generator,
) -> F64:
    """Value of every lab at every visit (visits x labs): the baseline at the index visit, else a re-draw."""
    z = rng.standard_normal((len(visit_person), len(LABS)))
    b = base[visit_person]
    v = np.empty_like(b)
    hba1c_low = np.minimum(m.HBA1C_NO_DIABETES["low"], m.HBA1C_DIABETES["low"])
    v[:, _LAB["hba1c"]] = np.clip(b[:, _LAB["hba1c"]] + m.HBA1C_FOLLOW_UP_SD * z[:, 0], hba1c_low, 14.0)
    v[:, _LAB["hba1c"]] = _round(v[:, _LAB["hba1c"]], 1)
    g = m.GLUCOSE
    v[:, _LAB["glucose"]] = np.clip(
        g["per_hba1c"] * v[:, _LAB["hba1c"]] + g["intercept"] + g["sd"] * z[:, 1], g["low"], g["high"]
    )
    egfr = np.rint(np.clip(egfr_latent[visit_person] + m.EGFR_FOLLOW_UP_SD * z[:, 3], 3.0, 150.0))
    v[:, _LAB["egfr"]] = egfr
    v[:, _LAB["creatinine"]] = _creatinine_umol(egfr, age[visit_person], male[visit_person])
    v[:, _LAB["ldl"]] = np.clip(b[:, _LAB["ldl"]] + 0.3 * z[:, 4], m.LDL["low"], m.LDL["high"])
    v[:, _LAB["sbp"]] = np.clip(b[:, _LAB["sbp"]] + 6.0 * z[:, 5], 85.0, 230.0)
    d = m.DBP
    v[:, _LAB["dbp"]] = np.clip(
        d["intercept"] + d["per_sbp"] * v[:, _LAB["sbp"]] + 5.0 * z[:, 6], 45.0, 130.0
    )
    v[:, _LAB["bmi"]] = np.clip(b[:, _LAB["bmi"]] + 0.5 * z[:, 7], m.BMI["low"], m.BMI["high"])
    for j, dec in enumerate(_LAB_DECIMALS):
        v[:, j] = _round(v[:, j], int(dec))
    # The index visit records the baseline exactly: the outcome model is defined on those values.
    v[is_index] = b[is_index]
    return v


def simulate_chunk(
    site: SiteProfile,
    scales: tuple[float, ...],
    patients: int,
    first_ids: dict[str, int],
    rng: np.random.Generator,
) -> Chunk:
    """Simulate `patients` patients of `site`. `first_ids[table]` is the id the table's first row gets.

    Every random draw is made for every patient (or visit) whether used or not, so the stream, and thus
    the output, depends only on the seed of the chunk.
    """
    n = patients
    ch = Chunk(patients=n)

    # --- demographics ---------------------------------------------------------------------------
    male = rng.random(n) >= site.female_share
    band = rng.choice(
        len(m.AGE_BANDS), size=n, p=np.asarray(site.age_band_weights) / sum(site.age_band_weights)
    )
    lo = np.array([b[0] for b in m.AGE_BANDS], dtype=np.float64)
    hi = np.array([b[1] for b in m.AGE_BANDS], dtype=np.float64)
    age_draw = lo[band] + rng.random(n) * (hi - lo)[band]
    index_day = rng.integers(_INDEX_FIRST, _INDEX_LAST + 1, size=n)
    birth_day = index_day - np.rint(age_draw * _YEAR).astype(np.int64)
    age = (index_day - birth_day) / _YEAR

    # --- chronic conditions ---------------------------------------------------------------------
    flags = np.zeros((n, len(m.CONDITION_MODELS)), dtype=np.bool_)
    u_cond = rng.random((n, len(m.CONDITION_MODELS)))
    for j, (cm, scale) in enumerate(zip(m.CONDITION_MODELS, scales, strict=True)):
        p = scale * np.asarray(cm.age_multipliers)[band] * np.where(male, cm.male_rr, 1.0)
        for other, rr in cm.rr_given.items():
            p = p * np.where(flags[:, _C[other]], rr, 1.0)
        flags[:, j] = u_cond[:, j] < p
    t2d, htn, ckd, ihd, copd = (flags[:, _C[k]] for k in ("t2d", "htn", "ckd", "ihd", "copd"))
    ckd_stage = rng.choice(3, size=n, p=m.CKD_STAGE_PROBABILITIES)  # 0, 1, 2 = stage 3, 4, 5
    # Diagnosed up to 15 years before the index visit, never before age 18.
    back_years = rng.random((n, len(m.CONDITION_MODELS))) * np.minimum(15.0, age - 18.0)[:, None]
    onset_day = index_day[:, None] - np.floor(back_years * _YEAR).astype(np.int64)
    n_chronic = flags.sum(axis=1)

    # --- baseline labs --------------------------------------------------------------------------
    z = rng.standard_normal((n, len(LABS)))
    u_lab = rng.random(n)
    hd, hn = m.HBA1C_DIABETES, m.HBA1C_NO_DIABETES
    hba1c = np.where(
        t2d,
        np.clip(hd["mean"] + hd["sd"] * z[:, 0], hd["low"], hd["high"]),
        np.clip(hn["mean"] + hn["sd"] * z[:, 0], hn["low"], hn["high"]),
    )
    hba1c = _round(hba1c, 1)
    e = m.EGFR_NO_CKD
    stage_lo = np.array([r[0] for r in m.CKD_STAGE_EGFR])[ckd_stage]
    stage_hi = np.array([r[1] for r in m.CKD_STAGE_EGFR])[ckd_stage]
    egfr_latent = np.where(
        ckd,
        stage_lo + u_lab * (stage_hi - 1.0 - stage_lo),  # top of the range stays below the next stage
        np.clip(e["intercept"] + e["per_year"] * age + e["sd"] * z[:, 3], e["low"], e["high"]),
    )
    egfr = np.rint(egfr_latent)

    # --- treatments -----------------------------------------------------------------------------
    tr = m.TREATMENT
    u = rng.random((n, 16))
    treat = np.zeros((n, len(DRUGS)), dtype=np.bool_)
    treat[:, _DRUG["metformin"]] = t2d & (
        u[:, 0] < np.where(egfr < 30, tr["metformin_if_t2d_egfr_below_30"], tr["metformin_if_t2d"])
    )
    treat[:, _DRUG["insulin_glargine"]] = t2d & (
        u[:, 1]
        < np.where(hba1c >= 9.0, tr["insulin_if_t2d_hba1c_9_or_more"], tr["insulin_if_t2d_hba1c_below_9"])
    )
    treat[:, _DRUG["sitagliptin"]] = t2d & (u[:, 2] < tr["sitagliptin_if_t2d"])
    sglt2 = t2d & (
        u[:, 3] < np.where(ckd | ihd, tr["sglt2_if_t2d_with_ckd_or_ihd"], tr["sglt2_if_t2d_otherwise"])
    )
    treat[:, _DRUG["dapagliflozin"]] = sglt2 & (u[:, 4] < 0.5)
    treat[:, _DRUG["empagliflozin"]] = sglt2 & (u[:, 4] >= 0.5)
    statin_p = np.where(
        ihd,
        tr["statin_if_ihd"],
        np.where(t2d, tr["statin_if_t2d"], np.where(htn, tr["statin_if_htn"], tr["statin_otherwise"])),
    )
    statin = u[:, 5] < statin_p
    treat[:, _DRUG["atorvastatin"]] = statin & (u[:, 6] < 0.6)
    treat[:, _DRUG["rosuvastatin"]] = statin & (u[:, 6] >= 0.6)
    acei = htn & (
        u[:, 7]
        < np.where(
            t2d | ckd, tr["ace_inhibitor_if_htn_with_t2d_or_ckd"], tr["ace_inhibitor_if_htn_otherwise"]
        )
    )
    treat[:, _DRUG["enalapril"]] = acei & (u[:, 8] < 0.5)
    treat[:, _DRUG["perindopril"]] = acei & (u[:, 8] >= 0.5)
    treat[:, _DRUG["losartan"]] = htn & ~acei & (u[:, 9] < tr["losartan_if_htn_without_ace_inhibitor"])
    treat[:, _DRUG["amlodipine"]] = htn & (u[:, 10] < tr["amlodipine_if_htn"])
    treat[:, _DRUG["aspirin"]] = ihd & (u[:, 11] < tr["aspirin_if_ihd"])
    treat[:, _DRUG["tiotropium"]] = copd & (u[:, 12] < tr["tiotropium_if_copd"])
    treat[:, _DRUG["salbutamol"]] = copd & (u[:, 13] < tr["salbutamol_if_copd"])
    antihypertensive = treat[
        :, [_DRUG[k] for k in ("enalapril", "perindopril", "losartan", "amlodipine")]
    ].any(axis=1)

    # --- the rest of the baseline panel ---------------------------------------------------------
    base = np.empty((n, len(LABS)), dtype=np.float64)
    base[:, _LAB["hba1c"]] = hba1c
    g = m.GLUCOSE
    base[:, _LAB["glucose"]] = _round(
        np.clip(g["per_hba1c"] * hba1c + g["intercept"] + g["sd"] * z[:, 1], g["low"], g["high"]), 1
    )
    base[:, _LAB["egfr"]] = egfr
    base[:, _LAB["creatinine"]] = np.rint(_creatinine_umol(egfr, age, male))
    ld = m.LDL
    base[:, _LAB["ldl"]] = _round(
        np.clip(
            ld["mean"] + ld["diabetes"] * t2d + ld["statin"] * statin + ld["sd"] * z[:, 4],
            ld["low"],
            ld["high"],
        ),
        1,
    )
    s = m.SBP
    sbp = np.clip(
        s["intercept"]
        + s["per_year_over_40"] * (age - 40.0)
        + s["htn"] * htn
        + s["treated"] * antihypertensive
        + s["sd"] * z[:, 5],
        85.0,
        230.0,
    )
    base[:, _LAB["sbp"]] = np.rint(sbp)
    d = m.DBP
    base[:, _LAB["dbp"]] = np.rint(
        np.clip(d["intercept"] + d["per_sbp"] * sbp + d["sd"] * z[:, 6], 45.0, 130.0)
    )
    bm = m.BMI
    base[:, _LAB["bmi"]] = _round(
        np.clip(
            bm["mean"] + bm["diabetes"] * t2d + bm["htn"] * htn + bm["sd"] * z[:, 7], bm["low"], bm["high"]
        ),
        1,
    )

    # --- outcome: death during follow-up --------------------------------------------------------
    eta = m.outcome_linear_predictor(age, male, hba1c, ckd, ihd, copd)
    dead = rng.random(n) < 1.0 / (1.0 + np.exp(-eta))
    death_day = index_day + 1 + np.floor(rng.random(n) * (_FU_END - index_day)).astype(np.int64)
    end_day = np.where(dead, death_day, _FU_END)

    # --- person, observation period, death ------------------------------------------------------
    pid = first_ids["person"] + np.arange(n, dtype=np.int64)
    ch.person = {
        "person_id": pid,
        "male": male,
        "birth_day": birth_day,
        "index_day": index_day,
        "end_day": end_day,
        "death_day": np.where(dead, death_day, NO_DAY),
    }

    # --- visits ---------------------------------------------------------------------------------
    years = (end_day - index_day) / _YEAR
    vr = m.VISIT_RATES
    n_op = rng.poisson((vr["outpatient"][0] + vr["outpatient"][1] * n_chronic) * years)
    n_ed = rng.poisson((vr["emergency"][0] + vr["emergency"][1] * n_chronic) * years)
    n_ip = rng.poisson((vr["inpatient"][0] + vr["inpatient"][1] * n_chronic) * years)
    counts = 1 + n_op + n_ed + n_ip
    total = int(counts.sum())
    vp = np.repeat(np.arange(n, dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - starts[vp]
    kind = np.where(
        pos <= n_op[vp],
        VISIT_OUTPATIENT,
        np.where(pos <= (n_op + n_ed)[vp], VISIT_EMERGENCY, VISIT_INPATIENT),
    )
    day = index_day[vp] + 1 + np.floor(rng.random(total) * (end_day - index_day)[vp]).astype(np.int64)
    day = np.where(pos == 0, index_day[vp], day)
    los = rng.geometric(0.25, size=total)
    order = np.lexsort((day, vp))  # by person, then date; the index visit stays first
    kind, day, los, is_index = kind[order], day[order], los[order], (pos == 0)[order]
    vend = np.where(kind == VISIT_INPATIENT, np.minimum(day + los, end_day[vp]), day)
    vid = first_ids["visit"] + np.arange(total, dtype=np.int64)
    ch.visit = {
        "visit_occurrence_id": vid,
        "person_id": pid[vp],
        "kind": kind.astype(np.int8),
        "start_day": day,
        "end_day": vend,
    }

    # --- conditions: problem list and one diagnosis per visit -----------------------------------
    pl_person, pl_cond = np.nonzero(flags)
    pl_code = _CHRONIC_FIRST_CODE[pl_cond] + np.where(pl_cond == _C["ckd"], ckd_stage[pl_person], 0)
    pl_start = onset_day[pl_person, pl_cond]
    u_v = rng.random((total, 3))
    chronic_reason = (n_chronic[vp] > 0) & (u_v[:, 0] < m.CHRONIC_VISIT_REASON)
    cum = np.cumsum(flags[vp], axis=1)
    kth = np.floor(u_v[:, 1] * n_chronic[vp]).astype(np.int64) + 1
    pick = np.argmax(cum >= kth[:, None], axis=1)
    chronic_code = _CHRONIC_FIRST_CODE[pick] + np.where(pick == _C["ckd"], ckd_stage[vp], 0)
    acute_code = _ACUTE_FIRST_CODE + rng.choice(len(ACUTE_CONDITIONS), size=total, p=_ACUTE_WEIGHTS)
    acute_len = 7 + np.floor(u_v[:, 2] * 15).astype(np.int64)
    dx_code = np.where(chronic_reason, chronic_code, acute_code)
    dx_end = np.where(chronic_reason, NO_DAY, np.minimum(day + acute_len, _FU_END))
    c_person = np.concatenate([pl_person, vp])
    c_group = np.concatenate([np.zeros(len(pl_person), np.int64), np.ones(total, np.int64)])
    c_seq = np.concatenate([np.arange(len(pl_person)), np.arange(total)])
    c_order = np.lexsort((c_seq, c_group, c_person))
    nc = len(c_order)
    ch.condition = {
        "condition_occurrence_id": first_ids["condition"] + np.arange(nc, dtype=np.int64),
        "person_id": pid[c_person[c_order]],
        "code": np.concatenate([pl_code, dx_code])[c_order].astype(np.int16),
        "start_day": np.concatenate([pl_start, day])[c_order],
        "end_day": np.concatenate([np.full(len(pl_person), NO_DAY, np.int64), dx_end])[c_order],
        "visit_occurrence_id": np.concatenate([np.full(len(pl_person), -1, np.int64), vid])[c_order],
    }

    # --- measurements ---------------------------------------------------------------------------
    t2d_v, htn_v, ckd_v, ihd_v = t2d[vp], htn[vp], ckd[vp], ihd[vp]
    group_p = np.column_stack(
        [
            np.full(total, 0.75),  # blood pressure
            np.where(t2d_v, 0.7, 0.05),  # HbA1c
            np.where(t2d_v, 0.5, 0.1),  # glucose
            np.where(ckd_v, 0.6, np.where(t2d_v | htn_v, 0.35, 0.1)),  # creatinine + eGFR
            np.where(ihd_v | statin[vp], 0.4, 0.1),  # LDL
            np.full(total, 0.15),  # BMI
        ]
    )
    drawn = (rng.random((total, group_p.shape[1])) < group_p) | is_index[:, None]
    lab_drawn = drawn[:, _LAB_GROUP]
    values = _lab_values(vp, is_index, base, age, male, egfr_latent, rng)
    mv, ml = np.nonzero(lab_drawn)
    nm = len(mv)
    ch.measurement = {
        "measurement_id": first_ids["measurement"] + np.arange(nm, dtype=np.int64),
        "person_id": pid[vp[mv]],
        "lab": ml.astype(np.int8),
        "day": day[mv],
        "value": values[mv, ml],
        "visit_occurrence_id": vid[mv],
    }

    # --- prescriptions at the index visit and at every outpatient visit -------------------------
    dv, dd = np.nonzero(treat[vp] & (kind == VISIT_OUTPATIENT)[:, None])
    d_start = day[dv]
    d_end = d_start + _DAYS_SUPPLY[dd] - 1
    nd = len(dv)
    ch.drug = {
        "drug_exposure_id": first_ids["drug"] + np.arange(nd, dtype=np.int64),
        "person_id": pid[vp[dv]],
        "drug": dd.astype(np.int8),
        "start_day": d_start,
        "end_day": d_end,
        "days_supply": _DAYS_SUPPLY[dd],
        "quantity": _QUANTITY[dd],
        # active while the supply lasts past the end of follow-up for a living patient
        "active": (d_end >= _FU_END) & (~dead[vp[dv]]),
        "visit_occurrence_id": vid[dv],
    }

    # --- procedures -----------------------------------------------------------------------------
    op, ed, ip = kind == VISIT_OUTPATIENT, kind == VISIT_EMERGENCY, kind == VISIT_INPATIENT
    copd_v = copd[vp]
    proc_p = np.column_stack(
        [
            np.maximum.reduce([0.6 * ed, 0.2 * (op & ihd_v), 0.3 * (is_index & (age[vp] >= 50.0))]),  # ECG
            np.maximum.reduce([0.35 * ed, 0.5 * ip, 0.1 * (op & copd_v)]),  # chest X-ray
            0.2 * (op & copd_v),  # spirometry
            0.25 * (ip & ihd_v),  # PCI
            0.9 * (ckd_v & (ckd_stage[vp] == 2)),  # haemodialysis in stage 5
        ]
    )
    pv, pc = np.nonzero(rng.random((total, len(PROCEDURES))) < proc_p)
    npr = len(pv)
    ch.procedure = {
        "procedure_occurrence_id": first_ids["procedure"] + np.arange(npr, dtype=np.int64),
        "person_id": pid[vp[pv]],
        "procedure": pc.astype(np.int8),
        "day": day[pv],
        "visit_occurrence_id": vid[pv],
    }

    # --- consent: one decision per patient and scenario -----------------------------------------
    k = len(SCENARIO_IDS)
    permit_p = np.array([site.consent_permit[s] for s in SCENARIO_IDS])
    withdraw_p = np.array([m.CONSENT_WITHDRAWAL[s] for s in SCENARIO_IDS])
    uc = rng.random((n, k, 5))
    permit = uc[:, :, 0] < permit_p
    last_decision = np.minimum(end_day, _CONSENT_UNTIL)
    decided_day = index_day[:, None] + np.floor(
        uc[:, :, 1] * (last_decision - index_day + 1)[:, None]
    ).astype(np.int64)
    room = end_day[:, None] - decided_day  # days after the decision while observed
    withdrawn = permit & (uc[:, :, 2] < withdraw_p) & (room >= 1)
    withdrawn_day = decided_day + 1 + np.floor(uc[:, :, 3] * np.maximum(room, 1)).astype(np.int64)
    # Office hours in UTC+8 (08:00-18:00) are 00:00-10:00 UTC.
    second = np.floor(uc[:, :, 4] * 36_000).astype(np.int64)
    decided_s = decided_day * _SECONDS_PER_DAY + second
    withdrawn_s = np.where(withdrawn, withdrawn_day * _SECONDS_PER_DAY + (second + 3_600) % 36_000, -1)
    nk = n * k
    ch.consent = {
        "consent_id": first_ids["consent"] + np.arange(nk, dtype=np.int64),
        "person_id": np.repeat(pid, k),
        "scenario": np.tile(np.arange(k, dtype=np.int8), n),
        "permit": permit.reshape(nk),
        "decided_s": decided_s.reshape(nk),
        "withdrawn_s": withdrawn_s.reshape(nk),
    }
    return ch
