//! Many events' values for one parameter, bound as one array of the parameter's type, each value
//! encoded by its own `ToSql` as it would be alone: what lets the fast path apply a group of
//! events as one statement over arrays.

use bytes::BytesMut;
use postgres_protocol::types::ArrayDimension;
use postgres_types::{IsNull, Kind, ToSql, Type};

/// One parameter's values over many events, bound as a one-dimensional array of the parameter's
/// type: each value is encoded by its own `ToSql`, as it would be alone.
#[derive(Debug)]
pub struct Column<'a>(pub Vec<&'a (dyn ToSql + Sync)>);

impl ToSql for Column<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let Kind::Array(member) = ty.kind() else {
            return Err(format!("a column of values binds an array, not `{ty}`").into());
        };
        let dimension = ArrayDimension { len: i32::try_from(self.0.len())?, lower_bound: 1 };
        postgres_protocol::types::array_to_sql(
            Some(dimension),
            member.oid(),
            self.0.iter(),
            |value, out| match value.to_sql_checked(member, out)? {
                IsNull::No => Ok(postgres_protocol::IsNull::No),
                IsNull::Yes => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Array(_))
    }

    postgres_types::to_sql_checked!();
}

/// How a parameter's type is written in a cast.
pub fn sql_type(ty: &postgres_types::Type) -> String {
    if ty.schema() == "pg_catalog" {
        ty.name().to_string()
    } else {
        format!("\"{}\".\"{}\"", ty.schema(), ty.name())
    }
}
